"""``inject``: put a method's adapters into a whole model in place, freeze the rest, and :func:`summary`."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from pyfastpeft.core.family import Method
from pyfastpeft.surgery.match import TargetSpec, match_modules
from pyfastpeft.surgery.methods import _method, adapter_state_dict, is_adapter, method_of

log = logging.getLogger("pyfastpeft")


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


MODULES_TO_SAVE_ATTR = "_pyfastpeft_modules_to_save"  # on the root model: module names that train fully
ORIGINALS_ATTR = "_pyfastpeft_originals"  # on the root model: name -> frozen copy of the module before training


def modules_to_save_of(model: nn.Module) -> List[str]:
    """The names of ``model``'s ``modules_to_save`` (PEFT's meaning: they train fully and travel with the
    adapter), as set by :func:`inject` or :func:`~pyfastpeft.load_adapter`."""
    mods = dict(model.named_modules())
    return [n for n in model.__dict__.get(MODULES_TO_SAVE_ATTR, []) if n in mods]


def _set_modules_to_save(model: nn.Module, names, originals_given: Optional[Dict[str, nn.Module]] = None) -> None:
    """Record ``names`` as modules to save, keeping a frozen copy of each as it is now (or ``originals_given``):
    the base model's module that :func:`~pyfastpeft.disable_adapters` puts back."""
    import copy

    mods = dict(model.named_modules())
    have = list(model.__dict__.get(MODULES_TO_SAVE_ATTR, []))
    originals = dict(model.__dict__.get(ORIGINALS_ATTR, {}))
    for n in names:
        if n not in have:
            have.append(n)
        if n not in originals:
            given = (originals_given or {}).get(n)
            originals[n] = (given if given is not None else copy.deepcopy(mods[n])).requires_grad_(False)
    model.__dict__[MODULES_TO_SAVE_ATTR] = have
    model.__dict__[ORIGINALS_ATTR] = originals


def _freeze_all_but_adapters(model: nn.Module) -> None:
    model.requires_grad_(False)
    for mod in model.modules():
        if is_adapter(mod):
            for t in adapter_state_dict(mod).values():
                if isinstance(t, nn.Parameter) and t.is_floating_point():
                    t.requires_grad_(True)
    mods = dict(model.named_modules())
    for n in modules_to_save_of(model):
        for t in mods[n].parameters():
            if t.is_floating_point():
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
    ctor = getattr(b.cls, b.ctor)
    names, var_kw = _accepted(ctor)
    use = kwargs if var_kw else {k: v for k, v in kwargs.items() if k in names}
    try:
        ad = ctor(layer, **use)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{b.cls.__name__}.{b.ctor} failed for {where} ({type(layer).__name__}): {e}") from e
    if backend is not None:
        ad.backend = backend
    return ad


def _check_kwargs(m: Method, kwargs: dict) -> None:
    """Each kwarg must be accepted by at least one of the method's constructors (catches typos)."""
    accepted: set = set()
    for b in m.builders:
        ctor = getattr(b.cls, b.ctor)
        names, var_kw = _accepted(ctor)
        if var_kw:
            return
        first = next(iter(inspect.signature(ctor).parameters))  # the base layer itself
        accepted |= names - {"self", "cls", first}
    bad = sorted(set(kwargs) - accepted)
    if bad:
        ctors = ", ".join(f"{b.cls.__name__}.{b.ctor}" for b in m.builders)
        raise ValueError(f"method {m.name!r}: unknown argument(s) {bad}; {ctors} accept "
                         f"{sorted(accepted - {b.ctor for b in m.builders})}")


def inject(model: nn.Module, method: str, /, *, target_modules: TargetSpec,
           exclude_modules: Optional[TargetSpec] = None, modules_to_save: Optional[TargetSpec] = None,
           backend: Optional[str] = None, verbose: bool = False, **method_kwargs: Any) -> nn.Module:
    """Replace the layers ``target_modules`` selects by ``method``'s adapter, in place; freeze all else.

    Args:
        model: any ``nn.Module`` (transformers, timm, plain torch).
        method: ``"lora"``, ``"gated_lora"``, ``"oft"``, ``"psoft"`` or ``"atoms"`` (:data:`METHODS`, the
            families' table: :func:`pyfastpeft.families.methods`).
        target_modules: a list of name suffixes, a regex (``re.fullmatch`` on the full name) or
            ``"all-linear"`` (every ``nn.Linear`` but the output head); PEFT's meanings.
        exclude_modules: names to leave out (list of suffixes or a regex); wins over ``target_modules``.
        modules_to_save: modules (list of name suffixes or a regex, e.g. ``["classifier"]``) that train
            fully and are written by :func:`~pyfastpeft.save_adapter` with the adapters (PEFT's meaning: a
            new classification head). They must not be adapter targets.
        backend: pin every new layer's backend (``None``: auto).
        verbose: print :func:`summary` (it is always logged at INFO on the ``pyfastpeft`` logger).
        **method_kwargs: the method's constructor arguments, e.g. ``r=8, alpha=16`` for LoRA. A method
            with several constructors (atoms: ``from_conv`` and ``from_linear``) gets each the ones it takes.
            ``model`` and ``method`` are positional-only, so OFT's own ``method="exact"`` is a kwarg here.

    Returns:
        ``model`` itself. ``pfp.summary(model)`` lists the adapters and the trainable parameter count.

    Raises:
        ValueError: unknown method, a pattern matching nothing (with close names), a matched
            module of a type the method does not support (naming the module and its type), a module that
            already holds an adapter, or an argument no constructor of the method takes.
    """
    m = _method(method)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_kwargs(m, method_kwargs)
    names = match_modules(model, target_modules, exclude_modules)
    modules = dict(model.named_modules())
    save_names: List[str] = []
    if modules_to_save is not None:
        try:
            save_names = match_modules(model, modules_to_save)
        except ValueError as e:
            raise ValueError(f"modules_to_save: {e}") from e
        save_names = [n for n in save_names if not any(n.startswith(o + ".") for o in save_names)]
        clash = sorted(set(save_names) & set(names))
        inner = sorted(n for n in save_names for t in names if n != t and (t.startswith(n + ".")
                                                                          or n.startswith(t + ".")))
        if clash or inner:
            raise ValueError(f"modules_to_save {clash or inner} overlap target_modules: a module either gets "
                             "an adapter or trains fully, not both")
        if not any(True for n in save_names for _ in modules[n].parameters()):
            raise ValueError(f"modules_to_save selected {save_names}, which hold no parameter")
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
    if save_names:
        _set_modules_to_save(model, save_names)
    _freeze_all_but_adapters(model)
    s = summary(model)
    log.info("pyfastpeft.inject(%s): %d module(s) replaced\n%s", method, len(mapping), s)
    if verbose:
        print(s)
    return model


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
