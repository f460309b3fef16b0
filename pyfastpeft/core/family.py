"""What a method family declares about itself: the one table the rest of the library loops over.

Each family package (``pyfastpeft/<family>/__init__.py``) builds one :class:`Family`; the list of family
names is :data:`pyfastpeft.families.FAMILIES`. The registry, ``pfp.<op>``, ``pfp.nn``, ``pfp.reference``,
``pfp.explain``, ``inject`` / ``from_peft`` / adapter files, and the tools (``check``, ``bench``, ``demo``,
``compile-report``, ``info``, the performance model) are all built from these declarations, so adding a
method is one folder per source tree plus one name in that list (``docs/adding-a-method.md``).

Entries the tools use only (check rows, twin checks, cost formulas, kernel modules, benchmarks) are
``"module:attribute"`` strings, resolved on first use by :func:`resolve`, so ``import pyfastpeft`` loads
none of them. Nothing here imports a family.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional


def resolve(ref: str) -> Any:
    """``"package.module:attr"`` -> the object (the module itself when there is no ``:attr``)."""
    mod, _, attr = ref.partition(":")
    obj = importlib.import_module(mod)
    return getattr(obj, attr) if attr else obj


@dataclass(frozen=True)
class Op:
    """One public functional op.

    Attributes:
        name: the public name (``pfp.<name>``).
        fn: the validated, autograd-aware function.
        explain: maps the public arguments to ``(registry, device, primitive args, backend)`` for
            :func:`pyfastpeft.explain`.
        reference: the fp64 oracle with the same arguments (never a backend).
        top_level: exported as ``pfp.<name>`` (``False`` for an op used through its family's API only).
    """

    name: str
    fn: Callable
    explain: Callable
    reference: Optional[Callable] = None
    top_level: bool = True


@dataclass(frozen=True)
class Builder:
    """How a method wraps one base layer type: ``cls.<ctor>(layer, **kwargs)``."""

    base_type: type
    cls: type
    ctor: str


@dataclass(frozen=True)
class Method:
    """An ``inject`` method.

    Attributes:
        name: the ``method`` argument of ``pfp.inject`` (``"lora"``).
        builders: per base layer type, the module class and constructor (first match wins).
        peft_layers: the PEFT layer classes this method converts, as ``(tuner, class name)`` pairs
            (``("lora", "Linear")`` is ``peft.tuners.lora.layer.Linear``); empty where PEFT lacks the method.
        demo: constructor kwargs the demo uses for a small model.
        peft_config: PEFT's config class name and kwargs equivalent to ``demo`` (``None`` without PEFT).
        demo_extra_targets: per demo model, extra target modules for this method.
    """

    name: str
    builders: tuple[Builder, ...]
    peft_layers: tuple[tuple[str, str], ...] = ()
    demo: Mapping[str, Any] = field(default_factory=dict)
    peft_config: Optional[tuple[str, Mapping[str, Any]]] = None
    demo_extra_targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def builder_for(self, module) -> Optional[Builder]:
        for b in self.builders:
            if isinstance(module, b.base_type):
                return b
        return None

    def classes(self) -> tuple[type, ...]:
        return tuple(b.cls for b in self.builders)

    def supported_types(self) -> str:
        return ", ".join(f"torch.nn.{b.base_type.__name__} ({b.cls.__name__}.{b.ctor})" for b in self.builders)


@dataclass(frozen=True)
class Family:
    """One method family: everything the rest of the library needs to know about it.

    Attributes:
        name: the folder name in ``csrc/``, ``triton_kernels/``, ``pyfastpeft/`` and ``tests/``.
        title: a few words for tables.
        doc: the family's maths and choices, a file under ``docs/``.
        ops: the public ops.
        modules: the ``nn.Module`` layers (exported in ``pfp.nn``).
        methods: the ``inject`` methods.
        exports: other public names of the family (``pfp.<name>``).
        checks: ``"module:attr"`` of a list of :class:`pyfastpeft.testing.OpCheck` rows (``pyfastpeft check``).
        twins: ``"module:attr"`` of ``{cuda op name: check(device) -> error}`` (first-use twin checks).
        costs: ``"module:attr"`` strings of ``{"pyfastpeft::<op>": cost fn}`` tables (the performance model).
        kernels: Triton kernel modules; each module's ``AOT_SPECS`` feed the compile report.
        benchmarks: the family's benchmark scripts (paths from the repository root).
    """

    name: str
    title: str
    doc: str
    ops: tuple[Op, ...] = ()
    modules: tuple[type, ...] = ()
    methods: tuple[Method, ...] = ()
    exports: Mapping[str, Any] = field(default_factory=dict)
    checks: str = ""
    twins: str = ""
    costs: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    benchmarks: tuple[str, ...] = ()
