"""Naive, differentiable, fp64-capable references: the test oracles. Never a backend.

A reference imports nothing from the kernels, fallbacks or their helpers, so a bug there cannot hide
in the oracle.
"""
from pyfastpeft.reference.gated_lora_linear import gated_lora_linear_ref
from pyfastpeft.reference.lora_linear import lora_linear_ref

__all__ = ["lora_linear_ref", "gated_lora_linear_ref"]
