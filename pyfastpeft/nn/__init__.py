"""Drop-in ``nn.Module`` layers: each wraps a frozen base layer and trains only its adapter.

Every family's layers (:func:`pyfastpeft.families.modules`), e.g. ``pfp.nn.LoRALinear``.
"""
from pyfastpeft.families import modules as _modules

globals().update(_modules())
__all__ = list(_modules())
