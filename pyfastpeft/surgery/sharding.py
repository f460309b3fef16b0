"""Adapters of sharded models: FSDP2 (``fully_shard``, DTensor parameters) and DeepSpeed ZeRO-3 (partitioned
parameters). ``docs/distributed.md``.

Inside the owning module's forward and backward FSDP2 and ZeRO-3 hand our layers full, plain parameters, so the
ops need nothing special there. Outside it (saving, loading, merging, printing ``tau``) a parameter is a shard:
a ``DTensor`` under FSDP2, a 0-element placeholder under ZeRO-3. The helpers here gather what is needed:

* :func:`full_tensors` (context manager): every parameter of the given modules is a full, plain tensor inside
  the block (FSDP2: ``DTensor.full_tensor()`` swapped in; ZeRO-3: ``deepspeed.zero.GatheredParameters``); with
  ``write_back=True`` what the block wrote goes back into the shards on exit.
* :func:`full_adapters`: the same for the adapter tensors of a whole model (not the frozen base weights).
* :func:`merge_sharded`: ``merge_and_unload`` of a sharded model, merged in place into the sharded base layers.
* :func:`full_state_dict`: the whole model's state dict gathered as full CPU tensors (to save a merged model).

Every function that gathers is collective: call it on every rank, in the same order.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from pyfastpeft.core.dtensor import is_zero3
from pyfastpeft.surgery.injection import _replace
from pyfastpeft.surgery.methods import base_layer_of, is_adapter

GATHER_HINT = ("save the adapter with pfp.save_adapter (on every rank) and merge it in one process "
               "(pfp.load_adapter into the base model, then pfp.merge_and_unload), or gather the full weights "
               "with pfp.surgery.full_state_dict(model)")


def _dtensor_cls():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def _fsdp_module_cls():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def is_dtensor(t) -> bool:
    """An FSDP2 / tensor-parallel ``DTensor``."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def sharding_of(model: nn.Module) -> Optional[str]:
    """``"FSDP2"``, ``"ZeRO-3"`` or ``None`` (a plain or DDP model: every rank holds full tensors)."""
    fsdp = _fsdp_module_cls()
    if fsdp is not None and any(isinstance(m, fsdp) for m in model.modules()):
        return "FSDP2"
    for t in model.parameters():
        if is_dtensor(t):
            return "FSDP2"
        if is_zero3(t):
            return "ZeRO-3"
    return None


def is_sharded(model: nn.Module) -> bool:
    return sharding_of(model) is not None


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_writer() -> bool:
    """Rank 0 of the default process group, or the only process: the one that writes files."""
    return not _dist_on() or torch.distributed.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if _dist_on():
        torch.distributed.barrier()


def full_shape(t: torch.Tensor) -> List[int]:
    """The unsharded shape of a parameter (a DTensor's ``shape`` is already global; ZeRO-3 keeps ``ds_shape``)."""
    return list(t.ds_shape) if is_zero3(t) else list(t.shape)


def checked_cpu(key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor, refusing shards: never an empty or partial tensor written silently."""
    if is_dtensor(t):
        raise ValueError(f"tensor {key!r} is still a sharded DTensor {tuple(t.shape)} (placements {t.placements}); "
                         "gather it first (pfp.save_adapter does this when called on every rank)")
    if is_zero3(t) and t.numel() != math.prod(t.ds_shape):
        raise ValueError(f"tensor {key!r} is a DeepSpeed ZeRO-3 partition placeholder of shape {tuple(t.shape)}, "
                         f"not the full {tuple(t.ds_shape)}; gather it with deepspeed.zero.GatheredParameters "
                         "(pfp.save_adapter does this when called on every rank)")
    return t.detach().contiguous().cpu()


def _reshard(modules: Iterable[nn.Module]) -> None:
    """FSDP2 leaves the root's parameters unsharded (plain, in the compute dtype) after a forward: reshard
    them, so that what is read is the sharded fp32 state, never a low-precision unsharded copy."""
    fsdp = _fsdp_module_cls()
    if fsdp is None:
        return
    seen = set()
    for top in modules:
        for m in top.modules():
            if isinstance(m, fsdp) and id(m) not in seen:
                seen.add(id(m))
                m.reshard()


def _slots(modules: Iterable[nn.Module], skip: Iterable[nn.Module] = ()) -> List[Tuple[nn.Module, str]]:
    """(owner, parameter name) of every parameter under ``modules``, each once, in a rank-independent order,
    not descending into ``skip``."""
    skip_ids = {id(m) for m in skip}
    out, seen = [], set()

    def walk(m):
        if id(m) in skip_ids:
            return
        for name, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append((m, name))
        for child in m.children():
            walk(child)

    for top in modules:
        walk(top)
    return out


@contextlib.contextmanager
def full_tensors(modules: Iterable[nn.Module], *, write_back: bool = False,
                 skip: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Inside the block every parameter under ``modules`` (not under ``skip``) is a full, plain tensor.

    FSDP2: each ``DTensor`` parameter is replaced by an ``nn.Parameter`` of its ``full_tensor()`` (its storage
    dtype, e.g. fp32 under a bf16 ``MixedPrecisionPolicy``), and put back on exit; with ``write_back=True``
    the full values are first copied into the local shards. ZeRO-3: ``deepspeed.zero.GatheredParameters``
    (``modifier_rank=0`` with ``write_back``: rank 0's values are kept; every rank should write the same).
    Plain parameters are left alone. Collective: every rank must enter with the same modules.
    """
    modules = list(modules)
    _reshard(modules)
    slots = _slots(modules, skip)
    swapped: List[Tuple[nn.Module, str, torch.Tensor]] = []
    zero3 = [m._parameters[n] for m, n in slots if is_zero3(m._parameters[n])]
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed  # only reachable with ZeRO-3 parameters, which only DeepSpeed makes

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if write_back else None))
        try:
            with torch.no_grad():
                for m, n in slots:
                    p = m._parameters[n]
                    if is_dtensor(p):
                        m._parameters[n] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                        swapped.append((m, n, p))
            yield
            if write_back:
                from torch.distributed.tensor import distribute_tensor

                with torch.no_grad():
                    for m, n, p in swapped:
                        full = m._parameters[n].detach().to(p.dtype)
                        p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
        finally:
            for m, n, p in swapped:
                m._parameters[n] = p


def _adapters(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    out, seen = [], set()
    for name, mod in model.named_modules():
        if is_adapter(mod) and id(mod) not in seen:
            seen.add(id(mod))
            out.append((name, mod))
    return out


@contextlib.contextmanager
def full_adapters(model: nn.Module, *, write_back: bool = False) -> Iterator[None]:
    """:func:`full_tensors` of every adapter's own parameters (its base layer stays sharded): what
    ``save_adapter`` / ``load_adapter`` read and write. A no-op on an unsharded model."""
    if not is_sharded(model):
        yield
        return
    ads = [m for _, m in _adapters(model)]
    bases = [b for b in (base_layer_of(m) for m in ads) if b is not None]
    with full_tensors(ads, write_back=write_back, skip=bases):
        yield


def merge_sharded(model: nn.Module) -> nn.Module:
    """``merge_and_unload`` of an FSDP2 / ZeRO-3 model: each adapter is merged with gathered full tensors and
    the result written into the shards of its own base layer, which then takes the adapter's place (still
    sharded, frozen). Every adapter is merged before any shard is written, so an adapter that cannot be
    merged raises ``ValueError`` with the model untouched. Collective: call it on every rank.
    """
    kind = sharding_of(model)
    pending: List[Tuple[nn.Module, nn.Module, Dict[str, torch.Tensor]]] = []
    for name, mod in _adapters(model):
        base = base_layer_of(mod)
        where = f"merge_and_unload: module {name!r} ({type(mod).__name__})"
        if base is None:
            raise ValueError(f"{where} has no base layer to merge into on a {kind}-sharded model; {GATHER_HINT}")
        targets = dict(base.named_parameters())
        with full_tensors([mod]):
            try:
                plain = mod.merged()
            except ValueError as e:
                raise ValueError(f"{where} cannot be merged: {e}") from e
            values = dict(plain.named_parameters())
            if set(values) != set(targets) or any(full_shape(targets[k]) != list(values[k].shape) for k in values):
                raise ValueError(f"{where}: its merged layer ({type(plain).__name__}) does not match its base layer "
                                 f"({type(base).__name__}) parameter for parameter; on a {kind}-sharded model "
                                 f"merging writes into the base layer; {GATHER_HINT}")
            local = {}
            for k, v in values.items():
                t = targets[k]
                v = v.detach().to(t.dtype)
                if is_dtensor(t):  # only this rank's shard is kept: memory stays sharded
                    from torch.distributed.tensor import distribute_tensor

                    v = distribute_tensor(v, t.device_mesh, t.placements).to_local()
                local[k] = v.clone()
        pending.append((mod, base, local))
    for mod, base, local in pending:
        params = dict(base.named_parameters())
        with full_tensors([base], write_back=True) if kind == "ZeRO-3" else contextlib.nullcontext():
            with torch.no_grad():
                for k, v in local.items():
                    t = params[k]
                    (t.to_local() if is_dtensor(t) else base.get_parameter(k)).copy_(v)
        base.train(mod.training)
        base.requires_grad_(False)
    _replace(model, {id(mod): base for mod, base, _ in pending})
    return model


def full_state_dict(model: nn.Module, *, cpu: bool = True) -> Dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered (FSDP2 ``DTensor`` or ZeRO-3 partition), on
    CPU by default, in the storage dtype: e.g. to save a merged model with ``save_pretrained(state_dict=...)``.
    Collective: call it on every rank (each gets the full dict; write it on rank 0 only)."""
    out: Dict[str, torch.Tensor] = {}
    with full_tensors([model]):
        for k, t in model.state_dict().items():
            t = t.full_tensor() if is_dtensor(t) else t  # a buffer or an un-swapped alias
            out[k] = checked_cpu(k, t).clone() if cpu else t.detach().clone()
    return out
