"""PEFT -> pyfastpeft: :func:`from_peft`, unwrapping a ``PeftModel`` and classifying PEFT layers.

The PEFT layer classes converted are each method's ``peft_layers`` in the table of families
(:class:`pyfastpeft.core.family.Method`); the layer's kind is the method's name.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from pyfastpeft.surgery.injection import _replace, _set_modules_to_save
from pyfastpeft.surgery.methods import METHODS

# PEFT layer classes we convert: (peft tuner, class name) -> kind (the method's name); OFTLinear.from_peft
# merges an OFT conv
_PEFT_LAYERS: Dict[Tuple[str, str], str] = {layer: name for name, m in METHODS.items() for layer in m.peft_layers}


def _peft_kind(module: nn.Module) -> Optional[str]:
    """``"lora"``, ``"oft"``, ``"psoft"`` (layers in :data:`_PEFT_LAYERS`), ``"other"`` (any other PEFT tuner
    layer), ``None`` (not a PEFT layer)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    if not isinstance(module, BaseTunerLayer):
        return None
    mod = type(module).__module__
    cls = type(module).__name__
    for (tuner, name), kind in _PEFT_LAYERS.items():
        if mod == f"peft.tuners.{tuner}.layer" and cls == name:
            return kind
    return "other"


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """PeftModel -> tuner (LoraModel, ...) -> the user's model; a plain model is returned as is."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return model
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _peft_class(method: str) -> type:
    """Our class whose ``from_peft`` converts a PEFT layer for ``method``: the first of the method's classes that
    has one (else its first class, which the caller reports)."""
    classes = METHODS[method].classes()
    return next((c for c in classes if callable(getattr(c, "from_peft", None))), classes[0])


def from_peft(peft_model: nn.Module, *, gated: bool = False, adapter_name: Optional[str] = None,
              merge_unsupported: bool = False) -> nn.Module:
    """The user's model out of a PEFT model, with every PEFT LoRA / OFT / PSOFT layer replaced by ours.

    Same parameters (copied, in PEFT's dtype: fp32 adapters on a bf16 model stay fp32), same outputs.
    ``gated=True`` turns LoRA layers into ``GatedLoRALinear`` with ``tau = 0`` (every token selected: the same
    outputs; ``tau`` then trains). PEFT's ``lora_bias=True`` is carried (``LoRALinear(lora_bias=True)``).
    PEFT ``modules_to_save`` wrappers become their trained copy and the model's ``modules_to_save`` (saved by
    :func:`~pyfastpeft.save_adapter`; :func:`~pyfastpeft.disable_adapters` puts the original back). Base
    parameters keep their ``requires_grad`` (PEFT's ``bias="all"`` / ``"lora_only"`` train base biases). Any
    other PEFT layer (DoRA and other LoRA variants, LoRA on Embedding, OFT on Conv2d, other tuners) raises a
    ``ValueError`` naming it, unless ``merge_unsupported=True``, which merges it with PEFT's own ``merge()``
    into a plain, frozen layer.

    Returns the unwrapped model (``peft_model.base_model.model`` for a ``PeftModel``), modified in place;
    adapter parameters train, the rest keeps its ``requires_grad``.
    """
    model = _unwrap_peft(peft_model)
    plan: List[Tuple[str, nn.Module, str]] = []  # what: "modules_to_save", "merge" or the method converting it
    classes: Dict[str, type] = {}
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p, _, _ in plan):
            continue  # inside a layer already planned
        kind = _peft_kind(mod)
        wrapper = type(mod).__name__ in ("ModulesToSaveWrapper",) and type(mod).__module__.startswith("peft.")
        if kind is None and not wrapper:
            continue
        if wrapper:
            plan.append((name, mod, "modules_to_save"))
            continue
        if kind == "other":
            if not merge_unsupported:
                raise ValueError(f"from_peft: module {name!r} is a PEFT {type(mod).__module__}.{type(mod).__name__},"
                                 " which pyfastpeft cannot represent (supported: LoRA, OFT and PSOFT on nn.Linear,"
                                 " OFT on nn.Conv2d by merging);"
                                 " pass merge_unsupported=True to merge it into a plain frozen layer")
            plan.append((name, mod, "merge"))
            continue
        method = "gated_lora" if gated and kind == "lora" else kind
        base = mod.get_base_layer() if callable(getattr(mod, "get_base_layer", None)) else None
        b = METHODS[method].builder_for(base) if base is not None else None
        if b is None and method == "gated_lora":
            raise ValueError(f"from_peft: module {name!r}: gated=True needs an nn.Linear base, got "
                             f"{type(base).__name__}")
        cls = classes[name] = b.cls if b is not None else _peft_class(method)
        if not callable(getattr(cls, "from_peft", None)):
            raise ValueError(f"from_peft: module {name!r} is a PEFT {kind.upper()} layer, but "
                             f"pyfastpeft.nn.{cls.__name__}.from_peft is not available in this install")
        active = list(getattr(mod, "active_adapters", []))
        if adapter_name is None and len(active) != 1:
            raise ValueError(f"from_peft: module {name!r} has {len(active)} active adapters {active}; "
                             "pass adapter_name= to pick one")
        plan.append((name, mod, method))
    if not plan:
        raise ValueError("from_peft: the model holds no PEFT adapter layer")
    grad_before = {id(q): q.requires_grad for q in model.parameters()}  # base biases PEFT trains stay trainable
    mapping: Dict[int, nn.Module] = {}
    saved: Dict[str, nn.Module] = {}
    for name, mod, what in plan:
        if what == "modules_to_save":
            key = adapter_name or mod.active_adapters[0]
            new = mod.modules_to_save[key]
            saved[name] = mod.original_module
        elif what == "merge":
            mod.merge(adapter_names=[adapter_name] if adapter_name else None)
            new = mod.get_base_layer()
            new.requires_grad_(False)
        else:
            cls = classes[name]
            kw = {"adapter_name": adapter_name} if adapter_name is not None else {}
            try:
                new = cls.from_peft(mod, **kw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"from_peft: module {name!r}: {e}") from e
            if what == "gated_lora":
                with torch.no_grad():
                    new.tau.zero_()
        new.train(mod.training)
        mapping[id(mod)] = new
    _replace(model, mapping)
    for q in model.parameters():  # our constructors froze the base layers they wrap: PEFT's flags win
        if id(q) in grad_before:
            q.requires_grad_(grad_before[id(q)])
    if saved:
        _set_modules_to_save(model, list(saved), saved)
    return model
