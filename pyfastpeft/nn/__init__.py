"""Drop-in ``nn.Module`` layers: each wraps a frozen base layer and trains only its adapter."""
from pyfastpeft.nn.gated_lora import GatedLoRALinear
from pyfastpeft.nn.lora import LoRALinear

__all__ = ["LoRALinear", "GatedLoRALinear"]
