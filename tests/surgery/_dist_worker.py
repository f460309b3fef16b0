"""The per-rank body of ``tests/surgery/test_distributed.py``: one gloo process group (2 CPU processes) runs
every method under DDP, FSDP2 and FSDP2 + MixedPrecisionPolicy(bf16, fp32) (and ZeRO-3 when asked), each
against one process on the whole batch (which every rank also computes, so nothing crosses processes but the
collectives under test). Rank 0 writes ``results.json``: per (method, mode, stage) the largest relative error.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

BATCH, STEPS, LR = 4, 3, 1e-2
METHOD_LIST = os.environ.get("PFP_DIST_METHODS", "lora,gated_lora,oft,psoft,atoms").split(",")


def rel(got, want) -> float:
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, f"shape {tuple(g.shape)} != {tuple(w.shape)}"
    return (g - w).norm().item() / max(w.norm().item(), 1e-30)


def batch(seed=7):
    from tests._tiny_models import VOCAB

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, 11), generator=g), torch.randint(0, VOCAB, (BATCH, 11), generator=g)


def loss_fn(model, x, y, dtype=None):
    out = model(x).logits
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))


def same_files(a: Path, b: Path) -> bool:
    """The same files in both directories (PEFT's format, ours, or both); JSON configs byte for byte, each
    safetensors file byte for byte but for its header, compared as JSON (safetensors writes its
    ``__metadata__`` map in a per-process hash order)."""
    names = sorted(f.name for f in a.iterdir())
    if not names or names != sorted(f.name for f in b.iterdir()):
        return False
    for name in names:
        if name.endswith(".json"):
            if (a / name).read_bytes() != (b / name).read_bytes():
                return False
            continue
        parts = []
        for d in (a, b):
            raw = (d / name).read_bytes()
            n = int.from_bytes(raw[:8], "little")
            parts.append((json.loads(raw[8:8 + n]), raw[8 + n:]))
        if parts[0] != parts[1]:
            return False
    return True


def make(method, seed=0):
    import pyfastpeft as pfp
    from tests._tiny_models import inject_case, perturb_adapters

    extra = {"tau_init": 0.02, "gate_width": 0.5} if method == "gated_lora" else {}
    model = inject_case("llama", method, seed=seed, **extra)
    perturb_adapters(model)
    if method == "gated_lora":  # tau at each layer's median ratio: about half the tokens selected
        with torch.no_grad():
            model(batch()[0])
            for m in model.modules():
                if isinstance(m, pfp.nn.GatedLoRALinear):
                    m.tau.fill_(float(m._ratio.median()))
    model.train()
    for m in model.modules():  # dropout-free: every rank and the reference see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert pfp.surgery.is_sharded(model) is False
    return model


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t):
    from pyfastpeft.surgery import sharding

    return t.full_tensor() if sharding.is_dtensor(t) else t


def adapter_tensors(model):
    import pyfastpeft as pfp

    with pfp.surgery.sharding.full_adapters(model):
        return {f"{n}.{k}": t.detach().clone() for n, m in model.named_modules() if pfp.surgery.is_adapter(m)
                for k, t in pfp.surgery.adapter_state_dict(m).items()}


def shard(model, mode):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if mode == "fsdp2_mp":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def zero3(model):
    """DeepSpeed ZeRO-3 (CPU accelerator, the existing gloo group), torch's AdamW as the client optimizer."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    cfg = {"train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(), "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    opt = torch.optim.AdamW(params, lr=LR) if params else None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params or None, optimizer=opt, config=cfg,
                                      dist_init_required=False)
    return engine


_REFS: dict = {}


def reference(method, mp: bool):
    """One process, whole batch: gradients, then STEPS AdamW steps; also a bf16 copy's gradients (the
    low-precision baseline of the mixed-precision comparison). Computed once per (method, mp)."""
    if (method, mp) not in _REFS:
        grads, base_lo, ref = _reference(method, mp)
        _REFS[(method, mp)] = grads, base_lo, {k: v.detach().clone() for k, v in ref.state_dict().items()}
    grads, base_lo, state = _REFS[(method, mp)]
    ref = make(method)
    ref.load_state_dict(state)
    return grads, base_lo, ref


def _backward(method, model, x, y):
    """The whole batch's loss gradient. Gated LoRA's τ surrogate scales its window by the mean ratio of the
    batch a process sees (docs/token_selective.md §2), so under data parallelism τ's gradient is the average of
    the per-process gradients, as BatchNorm's statistics are per process: for it the reference is the mean of
    the gradients of each rank's share of the batch, computed here in one process."""
    if method != "gated_lora":
        loss_fn(model, x, y).backward()
        return
    world = dist.get_world_size()
    for r in range(world):
        lo, hi = r * BATCH // world, (r + 1) * BATCH // world
        (loss_fn(model, x[lo:hi], y[lo:hi]) / world).backward()


def _reference(method, mp: bool):
    x, y = batch()
    ref = make(method)
    _backward(method, ref, x, y)
    grads = {n: p.grad.clone() for n, p in trainable(ref).items()}
    base_lo = None
    if mp:
        lo = copy.deepcopy(ref).to(torch.bfloat16)
        lo.zero_grad()
        _backward(method, lo, x, y)
        base_lo = {n: p.grad.float() for n, p in trainable(lo).items()}
    opt = torch.optim.AdamW(trainable(ref).values(), lr=LR)
    opt.step()
    for _ in range(STEPS - 1):
        opt.zero_grad()
        _backward(method, ref, x, y)
        opt.step()
    return grads, base_lo, ref


def run_mode(method, mode, rank, world, out: Path, res: dict):
    import pyfastpeft as pfp
    from tests._tiny_models import tiny_llama

    key = f"{method}/{mode}"
    x, y = batch()
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    grads_ref, grads_lo, ref = reference(method, mode == "fsdp2_mp")

    model = make(method)
    # save before any step: the file must equal an unsharded save byte for byte
    if rank == 0:
        pfp.save_adapter(make(method), out / key / "plain0")
    engine = None
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        fwd = wrapped
    elif mode == "zero3":
        engine = fwd = zero3(model)
    else:
        shard(model, mode)
        fwd = model
    repr(model)  # printing a sharded model reads tau and shapes outside any forward
    if method == "gated_lora" and mode != "ddp":  # reads tau outside the forward: a clear error, not a wrong loss
        try:
            pfp.gate_loss(model)
            res[key]["gate_loss_refused"] = "no error"
        except ValueError as e:
            res[key]["gate_loss_refused"] = "ok" if "not supported on a sharded model" in str(e) else str(e)
    pfp.save_adapter(model, out / key / "sharded0")
    dist.barrier()
    if rank == 0:
        res[key]["save_bytes_equal"] = same_files(out / key / "plain0", out / key / "sharded0")

    # gradients of the local half, averaged by DDP / FSDP2, against the whole batch in one process
    loss = loss_fn(fwd, x[lo:hi], y[lo:hi])
    engine.backward(loss) if engine is not None else loss.backward()
    errs, lo_errs = [], []
    for n, p in trainable(model).items():
        if engine is not None:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = full(p.grad)
        errs.append(rel(g, grads_ref[n]))
        if grads_lo is not None:
            lo_errs.append(rel(grads_lo[n], grads_ref[n]))
    res[key]["grad"] = max(errs)
    if lo_errs:
        res[key]["grad_lowp_baseline"] = max(lo_errs)
    if engine is not None:
        engine.step()
        for _ in range(STEPS - 1):
            engine.backward(loss_fn(fwd, x[lo:hi], y[lo:hi]))
            engine.step()
    else:
        opt = torch.optim.AdamW(trainable(model).values(), lr=LR)
        opt.step()
        for _ in range(STEPS - 1):
            opt.zero_grad()
            loss_fn(fwd, x[lo:hi], y[lo:hi]).backward()
            opt.step()
    want = adapter_tensors(ref)
    got = adapter_tensors(model)
    res[key]["train"] = max(rel(got[k], want[k]) for k in want)
    if mode == "zero3":
        res[key]["bytes_per_rank"] = sum(t.ds_tensor.numel() * t.ds_tensor.element_size() for t in model.parameters())
    elif mode != "ddp":
        res[key]["bytes_per_rank"] = sum(t.to_local().numel() * t.element_size() if pfp.surgery.sharding.is_dtensor(t)
                                         else t.numel() * t.element_size() for t in model.parameters())
    else:
        res[key]["bytes_per_rank"] = sum(t.numel() * t.element_size() for t in model.parameters())

    # save after training: every tensor as the unsharded state; reload into a fresh sharded model
    pfp.save_adapter(model, out / key / "trained", format="pyfastpeft")  # our key names (PEFT's: plain0/sharded0)
    dist.barrier()
    from safetensors.torch import load_file

    saved = load_file(str(out / key / "trained" / pfp.surgery.WEIGHTS_NAME))
    assert set(saved) == set(got)
    res[key]["save"] = max(rel(saved[k], got[k]) for k in got)
    fresh = make(method, seed=0)
    with torch.no_grad():  # other adapter values, so the load must overwrite them
        for m in fresh.modules():
            if pfp.surgery.is_adapter(m):
                for t in pfp.surgery.adapter_state_dict(m).values():
                    if t.is_floating_point():
                        t.add_(0.5)
    fwd2 = {"ddp": torch.nn.parallel.DistributedDataParallel, "zero3": zero3}.get(mode, lambda m: shard(m, mode))(fresh)
    pfp.load_adapter(fresh, out / key / "trained")
    back = adapter_tensors(fresh)
    res[key]["load"] = max(rel(back[k], saved[k]) for k in saved)
    # a fresh sharded model cannot take adapters injected after sharding: a ValueError, model untouched
    if mode != "ddp":
        plain = zero3(tiny_llama()).module if mode == "zero3" else shard(tiny_llama(), mode)
        try:
            pfp.load_adapter(plain, out / key / "trained")
            res[key]["load_uninjected_error"] = "no error"
        except ValueError as e:
            res[key]["load_uninjected_error"] = "ok" if "before sharding" in str(e) and not any(
                pfp.surgery.is_adapter(m) for m in plain.modules()) else str(e)

    # merge: gated with tau > 0 refuses (model untouched); then tau set <= 0 through the shards and merged
    if method == "gated_lora":
        before = adapter_tensors(model)
        try:
            pfp.merge_and_unload(model)
            res[key]["merge_refused"] = "no error"
        except ValueError as e:
            after = adapter_tensors(model)
            res[key]["merge_refused"] = "ok" if "tau" in str(e) and all(torch.equal(before[k], after[k])
                                                                         for k in before) else str(e)
        for mdl in (model, ref):
            with pfp.surgery.sharding.full_adapters(mdl, write_back=True), torch.no_grad():
                for m in mdl.modules():
                    if isinstance(m, pfp.nn.GatedLoRALinear):
                        m.tau.fill_(-0.5)
    pfp.merge_and_unload(model)
    pfp.merge_and_unload(ref)
    assert not any(pfp.surgery.is_adapter(m) for m in model.modules())
    sd = pfp.surgery.full_state_dict(model)
    want_sd = ref.state_dict()
    res[key]["merge"] = max(rel(sd[k], want_sd[k]) for k in want_sd)
    with torch.no_grad():
        res[key]["merge_logits"] = rel(fwd(x[lo:hi]).logits.float(), ref(x[lo:hi]).logits.float())


def cayley_on_dtensor(world) -> dict:
    """``pfp.cayley`` of a row-sharded DTensor (outside any module's forward) against the plain op: forward and
    gradient (random upstream), with the placements our registered strategy promises (Replicate)."""
    import pyfastpeft as pfp
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(5)
    v = (torch.randn(6, 28, generator=g) * 0.2).requires_grad_(True)  # 6 blocks of 8x8
    dR = torch.randn(6, 8, 8, generator=g)
    want = pfp.cayley(v, 8)
    want.backward(dR)
    vd = distribute_tensor(v.detach(), mesh, [Shard(0)]).requires_grad_(True)
    got = pfp.cayley(vd, 8)
    got.backward(distribute_tensor(dR, mesh, [Replicate()]))
    return {"placements": str(list(got.placements)), "fwd": rel(got.full_tensor(), want),
            "grad": rel(vd.grad.full_tensor(), v.grad), "grad_placements": str(list(vd.grad.placements))}


def main(rank, world, port, out, modes):
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("PFP_DIST_TIMEOUT", "240")), exit=True)  # never hang
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out)
    res = {}
    try:
        res["cayley_dtensor"] = cayley_on_dtensor(world)
        for method in METHOD_LIST:
            for mode in modes:
                key = f"{method}/{mode}"
                res[key] = {}
                try:
                    run_mode(method, mode, rank, world, out, res)
                except Exception as e:  # recorded, and the test fails naming it
                    res[key]["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
                    raise
    finally:
        (out / f"results_rank{rank}.json").write_text(json.dumps(res, indent=1))
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch.multiprocessing as mp

    mp.spawn(main, args=(2, int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")), nprocs=2)
