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
from pyfastpeft.testing import assert_rel_close
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


def _check_compiled(kind, method, backend):
    model = inject_case(kind, method)
    perturb_adapters(model)
    twin = copy.deepcopy(model)
    x = example_input(kind)
    want, want_grads = _eager_grads(twin, x)
    got, breaks = _compile_and_count(model, x, backend)
    assert breaks == 0
    assert_rel_close("output", got.detach(), want)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_rel_close(f"grad {n}", p.grad, want_grads[n])


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
