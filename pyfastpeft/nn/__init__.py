"""Drop-in ``nn.Module`` layers: each wraps a frozen base layer and trains only its adapter."""
from pyfastpeft.nn.gated_lora import GatedLoRALinear
from pyfastpeft.nn.lora import LoRALinear
from pyfastpeft.nn.atoms import AtomConv2d, AtomLinear
from pyfastpeft.nn.orthogonal import OFTLinear, PSOFTLinear
from pyfastpeft.nn.filter_block import FilterBlock

__all__ = ["LoRALinear", "GatedLoRALinear", "AtomConv2d", "AtomLinear"]
__all__ += ["OFTLinear", "PSOFTLinear"]
__all__ += ["FilterBlock"]
