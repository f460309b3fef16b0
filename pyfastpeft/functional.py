"""Functional API (autograd-aware). Also re-exported at the top level: ``pfp.lora_linear``."""
from pyfastpeft.ops.gated_lora_linear import gated_lora_linear
from pyfastpeft.ops.lora_linear import lora_linear

__all__ = ["lora_linear", "gated_lora_linear"]
