"""Injected models in the tools users already run: torch.compile(fullgraph) with no graph break (aot_eager;
inductor marked slow), DDP on CPU (gloo, 2 processes) with the gradients of one process, and a Hugging Face
Trainer run. Tiny transformers Llama and timm ViT built from configs; nothing is downloaded."""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

import pyfastpeft as pfp
from pyfastpeft.testing import PEER_REL, assert_rel_close
from tests._tiny_models import ALL_METHODS, VOCAB, example_input, inject_case, logits, perturb_adapters


def _compile_and_count(model, x, backend):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    y = logits(compiled, x)
    y.float().pow(2).mean().backward()
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return y, breaks


def _eager_grads(model, x):
    y = logits(model, x)
    y.float().pow(2).mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _tau_between_ratios(model, x):
    """Each gated layer's τ in the middle of the widest gap between its tokens' ratios (middle half of them),
    so that no token sits at the threshold: a compiled graph's rounding then cannot flip a token's selection
    (a discontinuity of the hard gate, not an error of either run)."""
    with torch.no_grad():
        logits(model, x)
        for m in model.modules():
            if isinstance(m, pfp.nn.GatedLoRALinear) and m._ratio is not None and m._ratio.numel() > 3:
                r = m._ratio.double().sort().values
                lo, hi = len(r) // 4, max(len(r) // 4 + 1, 3 * len(r) // 4)
                i = int(torch.argmax(r[lo + 1:hi + 1] - r[lo:hi])) + lo
                m.tau.fill_(float((r[i] + r[i + 1]) / 2))


def _check_compiled(kind, method, backend):
    model = inject_case(kind, method)
    perturb_adapters(model)
    if method == "gated_lora":
        _tau_between_ratios(model, example_input(kind))
    twin = copy.deepcopy(model)
    x = example_input(kind)
    want, want_grads = _eager_grads(twin, x)
    got, breaks = _compile_and_count(model, x, backend)
    assert breaks == 0
    assert_rel_close("output", got.detach(), want)
    taus = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".tau")}
    tau_tol = _tau_grad_sensitivity(model, x, want_grads, taus) if taus else {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_rel_close(f"grad {n}", p.grad, want_grads[n], rel=tau_tol.get(n, PEER_REL))


def _tau_grad_sensitivity(model, x, want_grads, taus, rel=1e-5):
    """Gated LoRA's τ gradient is a sum of terms of both signs over the tokens in its surrogate window
    (``docs/token_selective.md`` §2), so a change at the level of fp32 rounding elsewhere (a compiled
    graph's fused kernels) moves it by more than PEER_REL relative to its own size. Its tolerance is 10x how
    far it moves in eager mode when every trainable parameter is perturbed by ``rel`` (1e-5, ~100 fp32 ulps, as
    far as fused kernels move the activations after a few layers)."""
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for q in twin.parameters():
            q.grad = None
            if q.requires_grad and q.is_floating_point():
                q.mul_(1 + rel * torch.randn(q.shape, generator=g, dtype=q.dtype))
    _, moved = _eager_grads(twin, x)
    out = {}
    for n in taus:
        w = want_grads[n].double()
        out[n] = max(PEER_REL, 10 * (moved[n].double() - w).norm().item() / max(w.norm().item(), 1e-30))
    return out


@pytest.mark.parametrize("kind", ["llama", "vit"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_compile_fullgraph_aot_eager_no_graph_break(kind, method):
    _check_compiled(kind, method, "aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("kind,method", [("llama", "lora"), ("vit", "gated_lora")])
def test_compile_fullgraph_inductor_cpu(kind, method):
    _check_compiled(kind, method, "inductor")


# ---------------------------------------------------------------------------------------------------------
# DDP: gloo on CPU, 2 processes
# ---------------------------------------------------------------------------------------------------------
DDP_CASES = [("llama", "lora"), ("vit", "gated_lora")]
WORLD = 2


def _ddp_batch(kind):
    return example_input(kind, batch=4, seed=7)


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for kind, method in DDP_CASES:
            model = inject_case(kind, method)
            perturb_adapters(model)
            ddp = DDP(model)
            x = _ddp_batch(kind).chunk(WORLD)[rank]  # each rank its half; mean loss per rank
            logits(ddp, x).float().pow(2).mean().backward()  # DDP averages the ranks' gradients
            if rank == 0:
                grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
                torch.save(grads, os.path.join(out_dir, f"{kind}-{method}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh processes import torch, transformers and timm (~30 s of a 2-core machine)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_gloo_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for kind, method in DDP_CASES:
        model = inject_case(kind, method)
        perturb_adapters(model)
        if method == "gated_lora":
            # τ's surrogate window is scaled by the mean ratio of the batch a process sees (per process, as
            # BatchNorm's statistics): the reference is the mean of the per-rank gradients, in one process
            for half in _ddp_batch(kind).chunk(WORLD):
                (logits(model, half).float().pow(2).mean() / WORLD).backward()
        else:
            logits(model, _ddp_batch(kind)).float().pow(2).mean().backward()  # the full batch in one process
        got = torch.load(tmp_path / f"{kind}-{method}.pt")
        want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert set(got) == set(want) and want
        for n in want:
            assert_rel_close(f"{kind}/{method} grad {n}", got[n], want[n])


# ---------------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ---------------------------------------------------------------------------------------------------------
class _Synthetic(torch.utils.data.Dataset):
    """Token sequences of a fixed pattern (learnable): x_{t+1} = (3 x_t + 1) mod VOCAB."""

    def __init__(self, n=32, length=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        seq = [start]
        for _ in range(length - 1):
            seq.append((3 * seq[-1] + 1) % VOCAB)
        self.ids = torch.cat(seq, dim=1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_runs_a_few_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = inject_case("llama", "gated_lora").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Synthetic())
    out = trainer.train()
    assert out.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        if p.requires_grad and n.endswith("lora_B.weight"):
            assert changed, f"{n} did not train"
        if not p.requires_grad:
            assert not changed, f"frozen {n} changed"
    assert pfp.summary(model).trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
