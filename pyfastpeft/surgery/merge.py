"""``merge_and_unload``: every adapter layer back to a plain, frozen layer with the adapter merged."""
from __future__ import annotations

from typing import Dict

from torch import nn

from pyfastpeft.surgery import sharding
from pyfastpeft.surgery.injection import _replace
from pyfastpeft.surgery.methods import is_adapter


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its ``merged()`` plain layer (frozen, like PEFT's); returns ``model``.

    Raises the adapter's own ``ValueError`` (naming the module) when one cannot be merged, before any
    layer is replaced.

    A sharded model (FSDP2, DeepSpeed ZeRO-3): call it on every rank; each adapter is merged with gathered
    tensors into its own base layer, which stays sharded (:func:`~pyfastpeft.surgery.sharding.merge_sharded`).
    """
    if sharding.is_sharded(model):
        return sharding.merge_sharded(model)
    mapping: Dict[int, nn.Module] = {}
    for name, mod in model.named_modules():
        if is_adapter(mod) and id(mod) not in mapping:
            try:
                plain = mod.merged()
            except ValueError as e:
                raise ValueError(f"merge_and_unload: module {name!r} ({type(mod).__name__}) cannot be merged: "
                                 f"{e}") from e
            plain.train(mod.training)
            plain.requires_grad_(False)
            mapping[id(mod)] = plain
    _replace(model, mapping)
    return model
