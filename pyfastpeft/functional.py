"""Functional API (autograd-aware): every family's ops, also at the top level (``pfp.lora_linear``)."""
from pyfastpeft.families import ops as _ops

globals().update({_name: _op.fn for _name, _op in _ops().items()})
__all__ = sorted(_ops())
