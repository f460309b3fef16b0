"""Model surgery: put pyfastpeft adapters into a whole model, take them out, and convert PEFT models.

``inject(model, method, target_modules=...)`` replaces the matching layers in place by the method's
``pfp.nn`` module and freezes everything else; ``target_modules`` has PEFT's meanings:

* a list of names: a module matches when its full dotted name equals an entry or ends with
  ``"." + entry`` (so ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj`` but not ``xq_proj``);
* a string: a regular expression that must match the **full** module name (``re.fullmatch``);
* ``"all-linear"``: every ``nn.Linear`` except the output head. The head is the transformers model's
  ``get_output_embeddings()`` (what PEFT skips); we also skip a timm model's ``get_classifier()`` and,
  without either, a top-level ``score`` / ``classifier`` (PEFT skips those only for ``task_type=SEQ_CLS``).

``exclude_modules`` takes the same list / regex forms and wins over ``target_modules``.

Methods are looked up by class *name* in :mod:`pyfastpeft.nn` when used (:data:`METHODS`), so a method whose
module is not in this install raises a clear ``ValueError`` and works as soon as the class is there.
Every adapter module provides ``adapter_config()`` (kwargs that rebuild it with its constructor) and keeps
its frozen base layer as a child; :func:`adapter_state_dict` is what belongs to the adapter, not the base.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

log = logging.getLogger("pyfastpeft")

ALL_LINEAR = "all-linear"
# top-level names PEFT treats as a classification head (peft.utils.constants.SEQ_CLS_HEAD_NAMES)
_HEAD_NAMES = ("score", "classifier")

TargetSpec = Union[str, Sequence[str]]


# ----------------------------------------------------------------------------------------------------
# the method table
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Builder:
    """How a method wraps one base layer type: ``getattr(pyfastpeft.nn, cls_name).<ctor>(layer, **kwargs)``."""

    base_type: type
    cls_name: str
    ctor: str


@dataclass(frozen=True)
class Method:
    name: str
    builders: Tuple[Builder, ...]
    issue: str  # where the method's module comes from, for the "not available" message

    def classes(self) -> Dict[str, Optional[type]]:
        """Class name -> class (``None`` when it is not in this install)."""
        import pyfastpeft.nn as pnn

        return {b.cls_name: getattr(pnn, b.cls_name, None) for b in self.builders}

    def available(self) -> bool:
        return all(c is not None for c in self.classes().values())

    def builder_for(self, module: nn.Module) -> Optional[Builder]:
        # the first matching base type wins; exact nn.Linear subclasses (e.g. timm's) count as nn.Linear
        for b in self.builders:
            if isinstance(module, b.base_type):
                return b
        return None

    def supported_types(self) -> str:
        return ", ".join(f"torch.nn.{b.base_type.__name__} ({b.cls_name}.{b.ctor})" for b in self.builders)


METHODS: Dict[str, Method] = {
    "lora": Method("lora", (Builder(nn.Linear, "LoRALinear", "from_linear"),), "LoRA"),
    "gated_lora": Method("gated_lora", (Builder(nn.Linear, "GatedLoRALinear", "from_linear"),), "token-selective LoRA"),
    "oft": Method("oft", (Builder(nn.Linear, "OFTLinear", "from_linear"),), "the orthogonal family (OFT)"),
    "psoft": Method("psoft", (Builder(nn.Linear, "PSOFTLinear", "from_linear"),), "the orthogonal family (PSOFT)"),
    "atoms": Method("atoms", (Builder(nn.Conv2d, "AtomConv2d", "from_conv"),
                              Builder(nn.Linear, "AtomLinear", "from_linear")), "filter atoms"),
}


def _method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    m = METHODS[name]
    missing = [n for n, c in m.classes().items() if c is None]
    if missing:
        raise ValueError(f"method {name!r} is not available in this install: pyfastpeft.nn has no "
                         f"{', '.join(missing)} (the {m.issue} module has not landed in this version)")
    return m


def available_methods() -> List[str]:
    """Methods whose ``pfp.nn`` classes are present in this install."""
    return [n for n, m in METHODS.items() if m.available()]


def _class_to_method() -> Dict[type, str]:
    out: Dict[type, str] = {}
    for name, m in METHODS.items():
        for c in m.classes().values():
            if c is not None:
                out[c] = name
    return out


def method_of(module: nn.Module) -> Optional[str]:
    """The method name of a pyfastpeft adapter module (exact class; ``None`` for anything else)."""
    return _class_to_method().get(type(module))


def is_adapter(module: nn.Module) -> bool:
    """A pyfastpeft adapter layer: a class of :data:`METHODS`, or any ``pfp.nn`` module with ``merged()``."""
    if type(module) in _class_to_method():
        return True
    return type(module).__module__.startswith("pyfastpeft.nn") and callable(getattr(module, "merged", None))


def base_layer_of(module: nn.Module) -> Optional[nn.Module]:
    """The frozen base layer an adapter wraps (``.base_layer``, PEFT's name), or ``None``."""
    b = getattr(module, "base_layer", None)
    return b if isinstance(b, nn.Module) else None


def adapter_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's own parameters and persistent buffers: its state_dict without the base layer's entries.

    A module may define ``adapter_state_dict()`` itself (e.g. to include a base weight its init changed).
    """
    own = getattr(module, "adapter_state_dict", None)
    if callable(own):
        return dict(own())
    base = base_layer_of(module)
    base_ids = {id(t) for t in (list(base.parameters()) + list(base.buffers()))} if base is not None else set()
    return {k: v for k, v in module.state_dict(keep_vars=True).items()
            if not k.startswith("base_layer.") and id(v) not in base_ids}


# ----------------------------------------------------------------------------------------------------
# target_modules matching (PEFT's meanings)
# ----------------------------------------------------------------------------------------------------
def _name_matches(spec: TargetSpec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def output_head_names(model: nn.Module) -> set:
    """Names of the modules ``"all-linear"`` leaves out (the output / classification head)."""
    named = list(model.named_modules())
    heads: List[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            heads.append(get_out())
        except Exception:  # noqa: BLE001 - models that do not implement it raise NotImplementedError
            pass
    get_cls = getattr(model, "get_classifier", None)  # timm
    if callable(get_cls) and not any(isinstance(h, nn.Module) for h in heads):
        try:
            heads.append(get_cls())
        except Exception:  # noqa: BLE001
            pass
    if not any(isinstance(h, nn.Module) for h in heads):
        heads.extend(getattr(model, n, None) for n in _HEAD_NAMES)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return {n for n, m in named if id(m) in ids}


def _adapter_internal_names(model: nn.Module) -> set:
    """Names inside existing pyfastpeft adapters (their base layers, lora_A, ...): never targets."""
    out = set()
    for prefix, mod in model.named_modules():
        if is_adapter(mod):
            out.update(f"{prefix}.{sub}" if prefix else sub for sub, _ in mod.named_modules() if sub)
    return out


def _close_names(query: str, names: Iterable[str], n: int = 6) -> List[str]:
    names = [x for x in names if x]
    pool = set(names)
    for x in names:  # suffixes at module-name boundaries: "q_proj", "self_attn.q_proj", ...
        parts = x.split(".")
        pool.update(".".join(parts[i:]) for i in range(1, len(parts)))
    close = difflib.get_close_matches(query, sorted(pool), n=n, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(query, sorted(pool), n=n, cutoff=0.2)
    return close


def match_modules(model: nn.Module, target_modules: TargetSpec,
                  exclude_modules: Optional[TargetSpec] = None) -> List[str]:
    """Names of the modules ``target_modules`` selects (PEFT's meanings; see the module docstring).

    Raises ``ValueError`` for a pattern (or a list entry) that matches no module, listing close names.
    """
    if target_modules is None:
        raise ValueError("target_modules is required: a list of module-name suffixes, a regex string, or "
                         f"{ALL_LINEAR!r}")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be a non-empty list of non-empty strings, a regex string or "
                             f"{ALL_LINEAR!r}, got {target_modules!r}")
    if exclude_modules is not None and not isinstance(exclude_modules, str):
        exclude_modules = list(exclude_modules)
    internal = _adapter_internal_names(model)
    names = [n for n, _ in model.named_modules() if n and n not in internal]
    modules = dict(model.named_modules())
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        hits = [n for n in names if isinstance(modules[n], nn.Linear) and n not in heads]
        if not hits:
            raise ValueError(f"target_modules={ALL_LINEAR!r}: the model has no nn.Linear layer outside its "
                             f"output head ({sorted(heads) or 'none'})")
    elif isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from None
        hits = [n for n in names if re.fullmatch(target_modules, n)]
        if not hits:
            raise ValueError(f"target_modules regex {target_modules!r} matches no module name (re.fullmatch on "
                             f"the full dotted name); close names: {_close_names(target_modules, names)}")
    else:
        hits = [n for n in names if _name_matches(target_modules, n)]
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            hint = "; ".join(f"{t!r}: close names {_close_names(t, names)}" for t in unmatched)
            raise ValueError(f"target_modules entries match no module name (suffixes at '.' boundaries): {hint}")
    if exclude_modules:
        kept = [n for n in hits if not _name_matches(exclude_modules, n)]
        if not kept:
            raise ValueError(f"exclude_modules={exclude_modules!r} removes every module target_modules selected "
                             f"({len(hits)}: {hits[:6]}{' ...' if len(hits) > 6 else ''})")
        hits = kept
    return hits


# ----------------------------------------------------------------------------------------------------
# replacing modules
# ----------------------------------------------------------------------------------------------------
def _replace(model: nn.Module, mapping: Dict[int, nn.Module]) -> None:
    """Swap every child whose ``id`` is in ``mapping`` (all aliases of a shared module, not just one name)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = mapping.get(id(child))
            if new is not None and new is not child:
                setattr(parent, child_name, new)


def _accepted(fn: Callable) -> Tuple[set, bool]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params}, any(p.kind is p.VAR_KEYWORD for p in params)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    model.requires_grad_(False)
    for mod in model.modules():
        if is_adapter(mod):
            for t in adapter_state_dict(mod).values():
                if isinstance(t, nn.Parameter) and t.is_floating_point():
                    t.requires_grad_(True)


def build_adapter(method: str, layer: nn.Module, name: str = "", /, *, backend: Optional[str] = None,
                  **kwargs) -> nn.Module:
    """One adapter module of ``method`` around ``layer``; errors name the module and its type."""
    m = _method(method)
    b = m.builder_for(layer)
    where = f"module {name!r}" if name else "the layer"
    if b is None:
        raise ValueError(f"{where} is a {type(layer).__module__}.{type(layer).__name__}, which method {method!r} "
                         f"does not support (supported: {m.supported_types()})")
    ctor = getattr(m.classes()[b.cls_name], b.ctor)
    names, var_kw = _accepted(ctor)
    use = kwargs if var_kw else {k: v for k, v in kwargs.items() if k in names}
    try:
        ad = ctor(layer, **use)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{b.cls_name}.{b.ctor} failed for {where} ({type(layer).__name__}): {e}") from e
    if backend is not None:
        ad.backend = backend
    return ad


def _check_kwargs(m: Method, kwargs: dict) -> None:
    """Each kwarg must be accepted by at least one of the method's constructors (catches typos)."""
    accepted: set = set()
    for b in m.builders:
        ctor = getattr(m.classes()[b.cls_name], b.ctor)
        names, var_kw = _accepted(ctor)
        if var_kw:
            return
        first = next(iter(inspect.signature(ctor).parameters))  # the base layer itself
        accepted |= names - {"self", "cls", first}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        ctors = ", ".join(f"{b.cls_name}.{b.ctor}" for b in m.builders)
        raise ValueError(f"method {m.name!r}: unknown argument(s) {bad}; {ctors} accept "
                         f"{sorted(accepted - {b.ctor for b in m.builders})}")


def inject(model: nn.Module, method: str, /, *, target_modules: TargetSpec,
           exclude_modules: Optional[TargetSpec] = None, backend: Optional[str] = None, verbose: bool = False,
           **method_kwargs: Any) -> nn.Module:
    """Replace the layers ``target_modules`` selects by ``method``'s adapter, in place; freeze all else.

    Args:
        model: any ``nn.Module`` (transformers, timm, plain torch).
        method: ``"lora"``, ``"gated_lora"``, ``"oft"``, ``"psoft"`` or ``"atoms"`` (:data:`METHODS`).
        target_modules: a list of name suffixes, a regex (``re.fullmatch`` on the full name) or
            ``"all-linear"`` (every ``nn.Linear`` but the output head); PEFT's meanings.
        exclude_modules: names to leave out (list of suffixes or a regex); wins over ``target_modules``.
        backend: pin every new layer's backend (``None``: auto).
        verbose: print :func:`summary` (it is always logged at INFO on the ``pyfastpeft`` logger).
        **method_kwargs: the method's constructor arguments, e.g. ``r=8, alpha=16`` for LoRA. A method
            with several constructors (atoms: ``from_conv`` and ``from_linear``) gets each the ones it takes.
            ``model`` and ``method`` are positional-only, so OFT's own ``method="exact"`` is a kwarg here.

    Returns:
        ``model`` itself. ``pfp.summary(model)`` lists the adapters and the trainable parameter count.

    Raises:
        ValueError: unknown or unavailable method, a pattern matching nothing (with close names), a matched
            module of a type the method does not support (naming the module and its type), a module that
            already holds an adapter, or an argument no constructor of the method takes.
    """
    m = _method(method)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_kwargs(m, method_kwargs)
    names = match_modules(model, target_modules, exclude_modules)
    modules = dict(model.named_modules())
    for n in names:  # check every target before touching the model
        mod = modules[n]
        if is_adapter(mod):
            raise ValueError(f"module {n!r} already holds a pyfastpeft adapter ({type(mod).__name__}); "
                             "merge_and_unload the model first or target other modules")
        if m.builder_for(mod) is None:
            raise ValueError(f"target_modules selected module {n!r} of type {type(mod).__module__}."
                             f"{type(mod).__name__}, which method {method!r} does not support (supported: "
                             f"{m.supported_types()}); narrow target_modules or add it to exclude_modules")
    mapping: Dict[int, nn.Module] = {}
    grad_before = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for n in names:
            mod = modules[n]
            if id(mod) not in mapping:  # a module shared under two names gets one adapter
                mapping[id(mod)] = build_adapter(method, mod, n, backend=backend, **method_kwargs)
    except Exception:
        for p in model.parameters():  # constructors froze the base layers built so far: undo
            p.requires_grad_(grad_before.get(id(p), p.requires_grad))
        raise
    _replace(model, mapping)
    _freeze_all_but_adapters(model)
    s = summary(model)
    log.info("pyfastpeft.inject(%s): %d module(s) replaced\n%s", method, len(mapping), s)
    if verbose:
        print(s)
    return model


# ----------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """What pyfastpeft adapters a model holds and how many parameters train."""

    adapters: Dict[str, Tuple[str, str, int]] = field(default_factory=dict)  # name -> (method, class, #params)
    trainable: int = 0
    total: int = 0

    @property
    def replaced(self) -> List[str]:
        return list(self.adapters)

    def __str__(self) -> str:
        if not self.adapters:
            head = "no pyfastpeft adapter layers"
        else:
            w = max(len(n) for n in self.adapters)
            rows = [f"{'module':<{w}}  {'method':<10} {'class':<16} {'adapter params':>14}"]
            rows += [f"{n:<{w}}  {meth:<10} {cls:<16} {p:>14,}" for n, (meth, cls, p) in self.adapters.items()]
            head = "\n".join(rows)
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        return f"{head}\ntrainable params: {self.trainable:,} / {self.total:,} ({pct:.4f}%)"


def summary(model: nn.Module) -> Summary:
    """The adapter layers of ``model`` (name, method, class, adapter parameter count) and trainable counts."""
    s = Summary()
    for name, mod in model.named_modules():
        if is_adapter(mod):
            n = sum(t.numel() for t in adapter_state_dict(mod).values() if isinstance(t, nn.Parameter))
            s.adapters[name] = (method_of(mod) or "-", type(mod).__name__, n)
    seen = set()
    for p in model.parameters():  # parameters() de-duplicates shared tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        s.total += p.numel()
        if p.requires_grad:
            s.trainable += p.numel()
    return s


# ----------------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------------
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its ``merged()`` plain layer (frozen, like PEFT's); returns ``model``.

    Raises the adapter's own ``ValueError`` (naming the module) when one cannot be merged, before any
    layer is replaced.
    """
    mapping: Dict[int, nn.Module] = {}
    for name, mod in model.named_modules():
        if is_adapter(mod) and id(mod) not in mapping:
            try:
                plain = mod.merged()
            except ValueError as e:
                raise ValueError(f"merge_and_unload: module {name!r} ({type(mod).__name__}) cannot be merged: "
                                 f"{e}") from e
            plain.train(mod.training)
            plain.requires_grad_(False)
            mapping[id(mod)] = plain
    _replace(model, mapping)
    return model


# ----------------------------------------------------------------------------------------------------
# PEFT -> pyfastpeft
# ----------------------------------------------------------------------------------------------------
# PEFT layer classes we convert: (peft tuner, class name) -> kind; OFTLinear.from_peft merges an OFT conv
_PEFT_LAYERS = {("lora", "Linear"): "lora", ("oft", "Linear"): "oft", ("oft", "Conv2d"): "oft",
                ("psoft", "Linear"): "psoft"}


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


def from_peft(peft_model: nn.Module, *, gated: bool = False, adapter_name: Optional[str] = None,
              merge_unsupported: bool = False) -> nn.Module:
    """The user's model out of a PEFT model, with every PEFT LoRA / OFT / PSOFT layer replaced by ours.

    Same parameters (copied), same outputs. ``gated=True`` turns LoRA layers into ``GatedLoRALinear`` with
    ``tau = 0`` (every token selected: the same outputs; ``tau`` then trains). PEFT ``modules_to_save``
    wrappers become their trained copy. Any other PEFT layer (LoRA on Embedding/Conv, OFT on Conv2d, other
    tuners) raises a ``ValueError`` naming it, unless ``merge_unsupported=True``, which merges it with
    PEFT's own ``merge()`` into a plain, frozen layer.

    Returns the unwrapped model (``peft_model.base_model.model`` for a ``PeftModel``), modified in place;
    adapter parameters train, the rest keeps its ``requires_grad``.
    """
    import pyfastpeft.nn as pnn

    model = _unwrap_peft(peft_model)
    table = {"lora": "GatedLoRALinear" if gated else "LoRALinear", "oft": "OFTLinear", "psoft": "PSOFTLinear"}
    plan: List[Tuple[str, nn.Module, str]] = []
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
        cls = getattr(pnn, table[kind], None)
        if cls is None or not callable(getattr(cls, "from_peft", None)):
            raise ValueError(f"from_peft: module {name!r} is a PEFT {kind.upper()} layer, but "
                             f"pyfastpeft.nn.{table[kind]}.from_peft is not available in this install")
        active = list(getattr(mod, "active_adapters", []))
        if adapter_name is None and len(active) != 1:
            raise ValueError(f"from_peft: module {name!r} has {len(active)} active adapters {active}; "
                             "pass adapter_name= to pick one")
        plan.append((name, mod, table[kind]))
    if not plan:
        raise ValueError("from_peft: the model holds no PEFT adapter layer")
    mapping: Dict[int, nn.Module] = {}
    for name, mod, what in plan:
        if what == "modules_to_save":
            key = adapter_name or mod.active_adapters[0]
            new = mod.modules_to_save[key]
        elif what == "merge":
            mod.merge(adapter_names=[adapter_name] if adapter_name else None)
            new = mod.get_base_layer()
            new.requires_grad_(False)
        else:
            cls = getattr(pnn, what)
            kw = {"adapter_name": adapter_name} if adapter_name is not None else {}
            try:
                new = cls.from_peft(mod, **kw)
            except (TypeError, ValueError) as e:
                raise ValueError(f"from_peft: module {name!r}: {e}") from e
            if what == "GatedLoRALinear":
                with torch.no_grad():
                    new.tau.zero_()
        new.train(mod.training)
        mapping[id(mod)] = new
    _replace(model, mapping)
    return model


# ----------------------------------------------------------------------------------------------------
# adapters on disk
# ----------------------------------------------------------------------------------------------------
FORMAT = "pyfastpeft-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _jsonable(cfg: Any, where: str) -> Any:
    import json

    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_adapter: {where}.adapter_config() is not JSON-serialisable: {e}") from e
    return cfg


def save_adapter(model: nn.Module, path) -> Dict[str, Any]:
    """Write the adapters of ``model`` to the directory ``path``: ``adapter_model.safetensors`` (adapter
    parameters and buffers, at their full module path) and ``adapter_config.json`` (method, class, base
    layer type and shape, ``adapter_config()`` per module, pyfastpeft/torch versions). Returns the JSON dict.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    import pyfastpeft

    out = Path(path)
    tensors: Dict[str, torch.Tensor] = {}
    modules: Dict[str, Any] = {}
    for name, mod in model.named_modules():
        if not is_adapter(mod):
            continue
        meth = method_of(mod)
        cfg_fn = getattr(mod, "adapter_config", None)
        # a module that replaces what it stands for (SFP's FilterBlock) is rebuilt by its own from_config
        by_config = meth is None and callable(getattr(type(mod), "from_config", None))
        if (meth is None and not by_config) or not callable(cfg_fn):
            raise ValueError(f"save_adapter: module {name!r} ({type(mod).__name__}) has no method in METHODS, "
                             "no from_config() or no adapter_config(); it cannot be rebuilt on load")
        base = base_layer_of(mod)
        modules[name] = {
            "method": meth, "builder": "from_config" if by_config else "method", "class": type(mod).__name__,
            "base_type": type(base).__name__ if base is not None else None,
            "base_weight_shape": list(base.weight.shape) if base is not None and hasattr(base, "weight") else None,
            "config": _jsonable(cfg_fn(), name),
            "backend": getattr(mod, "backend", None),
        }
        for k, t in adapter_state_dict(mod).items():
            tensors[f"{name}.{k}" if name else k] = t.detach().contiguous().cpu()
    if not modules:
        raise ValueError("save_adapter: the model holds no pyfastpeft adapter layer")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "pyfastpeft_version": pyfastpeft.__version__,
            "torch_version": torch.__version__, "modules": modules}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT, "pyfastpeft": pyfastpeft.__version__})
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return meta


def _from_config(name: str, mod: nn.Module, info: dict, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    """A module that takes the place of ``mod`` (e.g. ``FilterBlock``), in the saved tensors' dtype."""
    import pyfastpeft.nn as pnn

    cls = getattr(pnn, info["class"], None)
    if cls is None:
        raise ValueError(f"load_adapter: module {name!r} needs pyfastpeft.nn.{info['class']}, which is not "
                         "available in this install")
    ref = next(iter(list(mod.parameters()) + list(mod.buffers())), None)
    saved = [t for k, t in tensors.items() if k.startswith(name + ".") and t.is_floating_point()]
    dtype = saved[0].dtype if saved else (ref.dtype if ref is not None else None)
    try:
        new = cls.from_config(info["config"], device=ref.device if ref is not None else None, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_adapter: {info['class']}.from_config failed for module {name!r}: {e}") from e
    new.train(mod.training)
    return new


def load_adapter(model: nn.Module, path, *, backend: Optional[str] = None) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model``; returns ``model``.

    ``model`` is a freshly built base model (each saved module path holds the plain base layer: the adapter
    is injected with the saved ``adapter_config``) or one that already holds the same adapters. Tensors are
    copied bit for bit (same dtype). Everything but the adapters is frozen, as after :func:`inject`.
    Nothing is changed when an error is raised: a missing module, a class mismatch, or a tensor whose shape
    differs (the error names the tensor and both shapes).
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    p = Path(path)
    cfg_path, w_path = (p / CONFIG_NAME, p / WEIGHTS_NAME) if p.is_dir() else (p.with_suffix(".json"), p)
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"load_adapter: expected {CONFIG_NAME} and {WEIGHTS_NAME} in {str(p)!r}")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_adapter: {str(cfg_path)!r} is not a {FORMAT} file (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"load_adapter: format_version {meta['format_version']} is newer than this pyfastpeft "
                         f"reads ({FORMAT_VERSION}); upgrade pyfastpeft")
    tensors = load_file(str(w_path))
    modules = dict(model.named_modules())
    # 1. build (not install) each adapter, or reuse an installed one of the same class
    built: Dict[str, nn.Module] = {}
    frozen_before: Dict[int, bool] = {id(q): q.requires_grad for q in model.parameters()}
    try:
        for name, info in meta["modules"].items():
            mod = modules.get(name)
            if mod is None:
                raise ValueError(f"load_adapter: the model has no module {name!r}; close names: "
                                 f"{_close_names(name, modules)}")
            if info.get("builder") == "from_config" and not (is_adapter(mod) and type(mod).__name__ == info["class"]):
                built[name] = _from_config(name, mod, info, tensors)
            elif is_adapter(mod):
                if type(mod).__name__ != info["class"]:
                    raise ValueError(f"load_adapter: module {name!r} holds a {type(mod).__name__}, the file a "
                                     f"{info['class']}")
                built[name] = mod
            else:
                ad = build_adapter(info["method"], mod, name, backend=backend if backend is not None
                                   else info.get("backend"), **info["config"])
                if type(ad).__name__ != info["class"]:
                    raise ValueError(f"load_adapter: module {name!r}: method {info['method']!r} built a "
                                     f"{type(ad).__name__}, the file holds a {info['class']}")
                built[name] = ad
        # 2. check every tensor before copying any
        targets: Dict[str, torch.Tensor] = {}
        for name, ad in built.items():
            for k, t in adapter_state_dict(ad).items():
                targets[f"{name}.{k}" if name else k] = t
        missing = sorted(set(targets) - set(tensors))
        extra = sorted(set(tensors) - set(targets))
        if missing or extra:
            raise ValueError(f"load_adapter: tensors differ from the model's adapters: missing in the file "
                             f"{missing[:8]}, unexpected in the file {extra[:8]}")
        for k, src in tensors.items():
            dst = targets[k]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"load_adapter: tensor {k!r} has shape {tuple(src.shape)} in the file but "
                                 f"{tuple(dst.shape)} in the model")
    except Exception:
        for q in model.parameters():  # constructors froze the base layers: undo
            q.requires_grad_(frozen_before.get(id(q), q.requires_grad))
        raise
    # 3. copy and install
    with torch.no_grad():
        for k, src in tensors.items():
            targets[k].copy_(src)
    _replace(model, {id(modules[n]): ad for n, ad in built.items() if ad is not modules[n]})
    _freeze_all_but_adapters(model)
    return model
