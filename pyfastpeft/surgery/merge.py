"""Adapters out: ``merge_and_unload`` (every adapter layer back to a plain, frozen layer with the adapter merged),
``unload`` (the base layers, no merge) and the ``disable_adapters`` context (the base model, temporarily)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

from torch import nn

from pyfastpeft.surgery import sharding
from pyfastpeft.surgery.injection import MODULES_TO_SAVE_ATTR, ORIGINALS_ATTR, _replace, modules_to_save_of
from pyfastpeft.surgery.methods import base_layer_of, is_adapter


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


def _base_mapping(model: nn.Module, where: str) -> Dict[int, nn.Module]:
    """adapter id -> its base layer, for every adapter of ``model``; a ValueError (nothing changed) for one that
    keeps no base layer (SFP's ``FilterBlock`` replaces the module it was fitted to)."""
    mapping: Dict[int, nn.Module] = {}
    for name, mod in model.named_modules():
        if is_adapter(mod) and id(mod) not in mapping:
            base = base_layer_of(mod)
            if base is None:
                raise ValueError(f"{where}: module {name!r} ({type(mod).__name__}) keeps no base layer: it replaced "
                                 "the module it stands for, so there is no base model to go back to")
            mapping[id(mod)] = base
    return mapping


def _originals_mapping(model: nn.Module) -> Dict[int, nn.Module]:
    """module to save id -> the base model's module (moved to the current module's device and dtype)."""
    mods = dict(model.named_modules())
    originals = model.__dict__.get(ORIGINALS_ATTR, {})
    mapping: Dict[int, nn.Module] = {}
    for n in modules_to_save_of(model):
        orig = originals.get(n)
        if orig is None:
            continue
        ref = next(iter(list(mods[n].parameters()) + list(mods[n].buffers())), None)
        if ref is not None:
            orig.to(device=ref.device)
        orig.train(mods[n].training)
        mapping[id(mods[n])] = orig
    return mapping


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with pfp.disable_adapters(model):`` the model computes as its base model (PEFT's ``disable_adapter``).

    Every adapter layer is swapped for its base layer, and every module in ``modules_to_save`` for the module
    as it was before training; on leaving the block (also on an exception) everything is put back. Gradients
    flow as in the base model (the base layers keep their ``requires_grad``). A DPO reference model, for one.

    Raises:
        ValueError: an adapter that keeps no base layer (SFP's ``FilterBlock``), before anything is swapped.
    """
    mapping = _base_mapping(model, "disable_adapters")
    mapping.update(_originals_mapping(model))
    back = {id(mapping[id(m)]): m for m in model.modules() if id(m) in mapping}
    _replace(model, mapping)
    try:
        yield model
    finally:
        _replace(model, back)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging it (PEFT's ``unload``): each adapter layer becomes its base layer,
    unchanged; ``modules_to_save`` keep their trained weights and become plain modules. Returns ``model``.

    Raises:
        ValueError: an adapter that keeps no base layer (SFP's ``FilterBlock``), before anything changes.
    """
    mapping = _base_mapping(model, "unload")
    _replace(model, mapping)
    model.__dict__.pop(MODULES_TO_SAVE_ATTR, None)
    model.__dict__.pop(ORIGINALS_ATTR, None)
    return model
