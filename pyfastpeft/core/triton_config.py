"""Autotune policy and ahead-of-time compile specs: the single choke point for Triton configuration.

GPU: the full config list. Interpreter (``TRITON_INTERPRET=1``, read when a kernel module is imported):
only the smallest config, since every config would run program by program in numpy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable


def interpreting() -> bool:
    """Must agree with what ``@triton.jit`` saw when the kernel modules were imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list, interpreter_config=None) -> list:
    """The configs to autotune over: all on a GPU; one small one under the interpreter."""
    if interpreting():
        if interpreter_config is not None:
            return [interpreter_config]
        return [min(configs, key=lambda c: _volume(c.kwargs))]
    return configs


def _volume(kw: dict) -> int:
    v = 1
    for k, val in kw.items():
        if k.startswith("BLOCK_"):
            v *= int(val)
    return v


@dataclass(frozen=True)
class AOTSpec:
    """One (kernel, dtype, config) to compile ahead of time for the compile report.

    ``kernel`` is the ``@triton.jit`` function (not the autotuner), ``signature`` maps every
    non-constexpr argument to a Triton type string (``"*bf16"``, ``"i32"``, ``"fp32"``) and every
    constexpr argument to ``"constexpr"``; ``constexprs`` gives the constexpr values.
    """

    name: str
    kernel: Callable
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    meta: dict[str, Any] = field(default_factory=dict)
