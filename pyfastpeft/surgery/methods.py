"""The ``inject`` methods, read from the table of families, and what makes a module a pyfastpeft adapter.

:data:`METHODS` is :func:`pyfastpeft.families.methods` (method name -> :class:`~pyfastpeft.core.family.Method`);
an adapter is an instance of one of the families' layer classes (:func:`pyfastpeft.families.modules`).
Every adapter module provides ``adapter_config()`` (kwargs that rebuild it with its constructor) and keeps
its frozen base layer as a child; :func:`adapter_state_dict` is what belongs to the adapter, not the base.
"""
from __future__ import annotations

import functools
from typing import Dict, FrozenSet, List, Optional

import torch
from torch import nn

from pyfastpeft.core.family import Method
from pyfastpeft.families import methods as _family_methods
from pyfastpeft.families import modules as _family_modules

METHODS: Dict[str, Method] = _family_methods()


def _method(name: str) -> Method:
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def available_methods() -> List[str]:
    """Every ``inject`` method (:data:`METHODS`), in the table's order."""
    return list(METHODS)


def _class_to_method() -> Dict[type, str]:
    return {c: name for name, m in METHODS.items() for c in m.classes()}


@functools.lru_cache(maxsize=None)
def _adapter_classes() -> FrozenSet[type]:
    return frozenset(_family_modules().values())


def method_of(module: nn.Module) -> Optional[str]:
    """The method name of a pyfastpeft adapter module (exact class; ``None`` for anything else)."""
    return _class_to_method().get(type(module))


def is_adapter(module: nn.Module) -> bool:
    """A pyfastpeft adapter layer: an instance (exact class) of a family's layer (``pfp.nn``), with or without
    an ``inject`` method (``FilterBlock`` has none)."""
    return type(module) in _adapter_classes()


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
