"""``pyfastpeft demo``: fine-tune a small timm ViT and a tiny Llama with every available method.

Both models are built from configs (nothing is downloaded) and trained for a few steps on synthetic data
that has something to learn (ViT: labels from a fixed random teacher on pooled pixels; Llama: sequences
``x_{t+1} = (a x_t + b) mod V``). Each ``inject`` method of the table of families (:func:`pyfastpeft.families.methods`)
runs through :func:`pyfastpeft.inject`; PEFT runs the same method where it has one (LoRA, OFT, PSOFT) on a
copy of the same base model and data. Reported per run: first and last loss, median step time
(forward + backward + AdamW, after one warm-up step), trainable parameters, and the bytes autograd saves
for backward in one training forward (``pfp.perf.saved_bytes``: the whole model's activations). Gated LoRA
trains with ``λ · pfp.gate_loss`` (λ = :data:`GATE_LAMBDA`, its thresholds at AdamW lr :data:`TAU_LR`); its
fraction of selected tokens at every step is kept (``demo.json``: ``selected``), shown in the table's note
(first -> last step, next to LoRA's last loss) and as a dashed line on the loss panel's right-hand axis.

Writes ``demo.json`` (rows, loss curves, metadata and the command), ``demo.csv`` and ``demo.png`` into the
output directory (``--out``; default ``./pyfastpeft-results/demo``, git-ignored). ``--quick`` is the small
setting a test runs (well under a minute on a small CPU).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from pyfastpeft.core.table import table
from pyfastpeft.tools.timing import FLAG, FOOTNOTE, LEGEND, noisy, ratio_text, spread, spread_text, time_interleaved

MODELS = ("vit", "llama")
VOCAB = 128
TARGETS = {"vit": ["qkv", "attn.proj", "fc1", "fc2"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]}
GATE_LAMBDA = 0.05  # weight of pfp.gate_loss for gated LoRA: raises tau so fewer tokens take the update
LR = 1e-2
TAU_LR = 0.1  # AdamW learning rate of gated LoRA's thresholds tau


@dataclass
class Task:
    name: str
    model: torch.nn.Module
    batches: list  # (input, target) pairs, cycled
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]
    tokens_per_batch: int


@dataclass
class Run:
    model: str
    method: str
    impl: str  # "pyfastpeft" or "peft"
    losses: list = field(default_factory=list)
    step_ms: Optional[float] = None
    step_ms_p20: Optional[float] = None
    step_ms_p80: Optional[float] = None
    trainable: Optional[int] = None
    saved_bytes: Optional[int] = None
    note: str = ""
    status: str = "ok"
    selected: list = field(default_factory=list)  # gated LoRA: fraction of tokens selected at each step

    def row(self) -> dict:
        return {"model": self.model, "method": self.method, "impl": self.impl, "status": self.status,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None, "step_ms": self.step_ms,
                "step_ms_p20": self.step_ms_p20, "step_ms_p80": self.step_ms_p80,
                "trainable_params": self.trainable, "saved_bytes": self.saved_bytes, "note": self.note}


# ----------------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------------
def vit_task(quick: bool, seed: int) -> Task:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=64, num_heads=4, depth=2 if quick else 4, num_classes=10)
    g = torch.Generator().manual_seed(seed + 1)
    teacher = torch.randn(3 * 4 * 4, 10, generator=g)
    batches = []
    for _ in range(4):
        x = torch.randn(16 if quick else 32, 3, 32, 32, generator=g)
        y = (F.adaptive_avg_pool2d(x, 4).flatten(1) @ teacher).argmax(-1)
        batches.append((x, y))
    return Task("vit", model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches[0][0].shape[0] * 17)


def llama_task(quick: bool, seed: int) -> Task:
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2 if quick else 4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 2)
    batches = []
    bs, length = (8, 16) if quick else (16, 32)
    for _ in range(4):
        seq = [torch.randint(0, VOCAB, (bs, 1), generator=g)]
        for _ in range(length - 1):
            seq.append((5 * seq[-1] + 3) % VOCAB)
        ids = torch.cat(seq, 1)
        batches.append((ids, ids))
    return Task("llama", model, batches, lambda m, b: m(input_ids=b[0], labels=b[1]).loss, bs * length)


TASKS = {"vit": vit_task, "llama": llama_task}


# ----------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------
def _forward_only(task: Task, model: torch.nn.Module) -> Callable:
    x = task.batches[0]
    return lambda: task.loss_fn(model, x)


def _saved_bytes(task: Task, model: torch.nn.Module) -> Optional[int]:
    from pyfastpeft.tools import perf

    model.train()
    return int(perf.saved_bytes(_forward_only(task, model)).total_bytes)


def train(task: Task, model: torch.nn.Module, run: Run, steps: int, progress: bool,
          extra_loss: Optional[Callable[[], torch.Tensor]] = None) -> Run:
    params = [p for p in model.parameters() if p.requires_grad]
    run.trainable = sum(p.numel() for p in params)
    run.saved_bytes = _saved_bytes(task, model)
    # gated LoRA's thresholds get their own, larger learning rate (as the README's example): AdamW moves a
    # scalar by about its lr per step, and 30 steps at LR would not let them reach their equilibrium
    taus = {id(m.tau) for m in model.modules() if type(m).__name__ == "GatedLoRALinear"}
    groups = [{"params": [p for p in params if id(p) not in taus]}]
    if taus:
        groups.append({"params": [p for p in params if id(p) in taus], "lr": TAU_LR})
    opt = torch.optim.AdamW(groups, lr=LR)
    model.train()
    bar = _bar(steps, f"{task.name}/{run.method} ({run.impl})", progress)
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss = task.loss_fn(model, task.batches[len(losses) % len(task.batches)])
        total = loss + extra_loss() if extra_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.detach())

    def tick(_: Any = None) -> None:  # before each step (untimed): the bar shows the step before
        if bar is not None and len(losses) > bar.n:
            bar.set_postfix(loss=f"{float(losses[-1]):.3f}")
            bar.update(1)

    warmup = 1 if steps > 1 else 0  # the first step is a warm-up; the median of the others is the step time
    t = time_interleaved({"step": step}, warmup=warmup, min_rounds=steps - warmup, max_rounds=steps - warmup,
                         setup=tick)["step"]
    tick()
    if bar is not None:
        bar.close()
    run.losses = [float(v) for v in losses]
    run.step_ms, run.step_ms_p20, run.step_ms_p80 = 1e3 * t.median, 1e3 * t.p20, 1e3 * t.p80
    return run


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except Exception:  # noqa: BLE001 - progress is optional
        return None
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


def run_ours(task: Task, method: str, steps: int, progress: bool, backend: Optional[str]) -> Run:
    import pyfastpeft as pfp

    from pyfastpeft.families import methods

    m = methods()[method]  # the method's demo settings come from its family's declaration
    model = copy.deepcopy(task.model)
    targets = TARGETS[task.name] + list(m.demo_extra_targets.get(task.name, ()))
    pfp.inject(model, method, target_modules=targets, backend=backend, **m.demo)
    run = Run(task.name, method, "pyfastpeft")
    extra = None
    if method == "gated_lora":
        layers = [m for m in model.modules() if isinstance(m, pfp.nn.GatedLoRALinear)]
        fractions: list[torch.Tensor] = []

        def extra() -> torch.Tensor:  # after the step's forward: its selection, kept on the device (no sync)
            fractions.append(torch.stack([m._selected.float().mean() for m in layers]).mean())
            return GATE_LAMBDA * pfp.gate_loss(model)

    train(task, model, run, steps, progress, extra)
    if method == "gated_lora":
        run.selected = [float(f) for f in fractions][-len(run.losses):]  # the saved-bytes forward is not a step
        run.note = (f"tokens selected {100 * run.selected[0]:.0f}% -> {100 * run.selected[-1]:.0f}% "
                    f"(gate_loss x{GATE_LAMBDA:g})")
    return run


def run_peft(task: Task, method: str, steps: int, progress: bool) -> Optional[Run]:
    from pyfastpeft.families import methods

    if methods()[method].peft_config is None:
        return None
    try:
        import peft
    except ImportError:
        return None
    cls_name, kw = methods()[method].peft_config
    cls = getattr(peft, cls_name, None)
    if cls is None:
        return None
    model = peft.get_peft_model(copy.deepcopy(task.model), cls(target_modules=TARGETS[task.name], **kw))
    return train(task, model, Run(task.name, method, "peft"), steps, progress)


# ----------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------
COLUMNS = ["model", "method", "impl", "status", "loss_first", "loss_last", "step_ms", "step_ms_p20", "step_ms_p80",
           "trainable_params", "saved_bytes", "note"]
#: One colour per implementation, used by every panel of the plot and its legends.
IMPL_COLORS = {"pyfastpeft": "tab:blue", "peft": "tab:gray"}
IMPL_NAMES = {"pyfastpeft": "pyfastpeft", "peft": "PEFT"}
METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _fmt(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _noisy(r: dict) -> bool:
    return noisy(r.get("step_ms"), r.get("step_ms_p20"), r.get("step_ms_p80"))


def summary_table(rows: Sequence[dict]) -> str:
    """One line per run: losses, median step ms with its spread ((p80 - p20) / median; ``!`` over 20 %: not a
    result), our step time over PEFT's (``(x)!`` when either timing is flagged), parameters, saved MiB."""
    by = {(r["model"], r["method"]): r for r in rows if r["impl"] == "peft" and r["step_ms"]}
    body = []
    flagged = False
    for r in rows:
        p = by.get((r["model"], r["method"]))
        bad = _noisy(r)
        vs = ""
        if r["impl"] == "pyfastpeft" and p and r["step_ms"]:
            vs = ratio_text(r["step_ms"] / p["step_ms"], bad or _noisy(p))
            flagged = flagged or bad or _noisy(p)
        flagged = flagged or bad
        sp = spread(r.get("step_ms"), r.get("step_ms_p20"), r.get("step_ms_p80"))
        body.append([r["model"], r["method"], r["impl"], _fmt(r["loss_first"], ".3f"), _fmt(r["loss_last"], ".3f"),
                     _fmt(r["step_ms"], ".1f") + (f" {FLAG}" if bad else ""),
                     spread_text(sp) if r["step_ms"] is not None else "", vs, _fmt(r["trainable_params"], ","),
                     _fmt(r["saved_bytes"] / 2**20 if r["saved_bytes"] is not None else None, ".2f"),
                     r["note"] if r["status"] == "ok" else r["status"]])
    out = table(["model", "method", "impl", "loss first", "loss last", "step ms", "spread", "x peft", "trainable",
                 "saved MiB", "note"], body)
    return out + ("\n" + FOOTNOTE if flagged else "")


def plot(result: dict, path: Path) -> Optional[str]:
    """Write :func:`figure` to ``path``. None, or why no PNG was written."""
    from pyfastpeft.tools import figures

    return figures.save(figure(result), path, dpi=100)


def figure(result: dict) -> Any:
    """Per model (one row of panels): loss curves, median step ms, saved MiB (headless, Agg).

    Every panel draws an implementation in its one colour (:data:`IMPL_COLORS`: pyfastpeft blue, PEFT grey) and
    has a legend with exactly those colours; in the loss panel the method is the marker, and PEFT's curve (often
    equal to ours) is drawn wide and pale underneath. Step times are on a log axis (one slow run does not squash
    the others), with p20-p80 whiskers; a run whose spread exceeds 20 % is hatched and labelled ``!``. Returns the figure or why there is none."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except Exception as e:  # noqa: BLE001
        return f"no PNG: matplotlib not importable ({type(e).__name__}: {e})"
    runs = [r for r in result["rows"] if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    if not models:
        return "no PNG: no run finished"
    methods = list(dict.fromkeys(r["method"] for r in runs))
    marker = {m: METHOD_MARKERS[i % len(METHOD_MARKERS)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        mr = [r for r in runs if r["model"] == m]
        impls = list(dict.fromkeys(r["impl"] for r in mr))
        labels = [f"{r['method']} ({'ours' if r['impl'] == 'pyfastpeft' else IMPL_NAMES.get(r['impl'], r['impl'])})"
                  for r in mr]
        ax = axes[i][0]
        for r in mr:
            curve = result["curves"][f"{m}/{r['method']}/{r['impl']}"]
            peft = r["impl"] == "peft"  # PEFT's curve often equals ours: drawn wide and pale underneath
            ax.plot(range(1, len(curve) + 1), curve, color=IMPL_COLORS.get(r["impl"], "tab:orange"),
                    lw=4.0 if peft else 1.3, alpha=0.45 if peft else 1.0, zorder=1 if peft else 2,
                    marker=marker[r["method"]], ms=7 if peft else 4,
                    label=f"{r['method']} ({IMPL_NAMES.get(r['impl'], r['impl'])})")
        ax.set_title(f"{m}: training loss (colour: implementation, marker: method; PEFT wide and pale)",
                     fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        sel = [(r, result.get("selected", {}).get(f"{m}/{r['method']}/{r['impl']}")) for r in mr]
        sel = [(r, frac) for r, frac in sel if frac]
        handles, _ = ax.get_legend_handles_labels()
        if sel:  # gated LoRA's selected fraction per step, on a right-hand axis
            ax2 = ax.twinx()
            for r, frac in sel:
                impl = r["impl"]
                (line,) = ax2.plot(range(1, len(frac) + 1), [100 * f for f in frac], ls="--", lw=1.3,
                                   color=IMPL_COLORS.get(impl, "tab:orange"),
                                   label=f"{r['method']} tokens selected ({IMPL_NAMES.get(impl, impl)}, right axis)")
                handles.append(line)
            ax2.set_ylim(0, 105)
            ax2.set_ylabel("gated LoRA: tokens selected, % (dashed)", fontsize=8)
        ax.legend(handles=handles, fontsize=7, ncol=2)
        for ax, key, ylabel, title in (
                (axes[i][1], "step_ms", "median step ms (CPU, measured; log scale)",
                 f"{m}: step time (whiskers p20-p80): lower is better"),
                (axes[i][2], "saved_bytes", "saved for backward, MiB (counted)",
                 f"{m}: activation memory: lower is better")):
            scale = 2**20 if key == "saved_bytes" else 1
            vals = [(r[key] / scale) if r[key] is not None else 0.0 for r in mr]
            colors = [IMPL_COLORS.get(r["impl"], "tab:orange") for r in mr]
            cont = ax.bar(range(len(mr)), vals, color=colors)
            bad = [key == "step_ms" and _noisy(r) for r in mr]
            for patch, b in zip(cont.patches, bad):
                if b:
                    patch.set_hatch("///")
                    patch.set_alpha(0.45)
                    patch.set_edgecolor("dimgray")
            fmt = ".1f" if key == "step_ms" else ".2f"
            for j, (v, b, r) in enumerate(zip(vals, bad, mr)):  # above the bar, or above its p80 whisker
                top = max(v, (r.get("step_ms_p80") or 0.0) if key == "step_ms" else 0.0)
                ax.annotate(format(v, fmt) + (f" {FLAG}" if b else ""), (j, top), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
            if key == "step_ms":
                spread_known = [(j, v, r) for j, (v, r) in enumerate(zip(vals, mr))
                                if r.get("step_ms_p20") is not None and r.get("step_ms_p80") is not None and v > 0]
                if spread_known:
                    ax.errorbar([j for j, _, _ in spread_known], [v for _, v, _ in spread_known],
                                yerr=[[max(v - r["step_ms_p20"], 0.0) for _, v, r in spread_known],
                                      [max(r["step_ms_p80"] - v, 0.0) for _, v, r in spread_known]],
                                fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
                ax.set_yscale("log")  # one slow run must not squash the others
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
                pos = [v for v in vals if v > 0]
                if pos:
                    ax.set_ylim(min(pos) / 2, max(max(pos), max(r.get("step_ms_p80") or 0 for r in mr)) * 3)
            else:
                ax.set_ylim(0, max(vals + [1e-9]) * 1.35)
            ax.set_xticks(range(len(mr)))
            ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right", rotation_mode="anchor")
            ax.set_xlabel("method / implementation")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(title, fontsize=9)
            handles = [Patch(facecolor=IMPL_COLORS.get(k, "tab:orange"), label=IMPL_NAMES.get(k, k)) for k in impls]
            if any(bad):
                handles.append(Patch(facecolor="lightgray", edgecolor="dimgray", hatch="///", label=LEGEND))
            ax.legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle(f"pyfastpeft demo on {result['metadata'].get('device_name', '?')}: "
                 + ", ".join(f"{IMPL_NAMES[k]} = {IMPL_COLORS[k].replace('tab:', '')}" for k in IMPL_COLORS))
    fig.tight_layout()
    return fig


def write(result: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "demo.json", "csv": out / "demo.csv", "png": out / "demo.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(result["rows"])
    why = plot(result, paths["png"])
    if why is not None:
        result["notes"].append(why)
        paths["png"] = None
    return paths


# ----------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------
def run(models: Sequence[str], methods: Sequence[str], *, quick: bool, steps: int, progress: bool,
        backend: Optional[str], with_peft: bool, seed: int, argv: Sequence[str]) -> dict:
    from pyfastpeft.tools import bench

    meta = bench.metadata(torch.device("cpu"), ["demo", *argv])
    result: dict = {"metadata": meta, "rows": [], "curves": {}, "notes": []}
    for name in models:
        try:
            task = TASKS[name](quick, seed)
        except ImportError as e:
            result["notes"].append(f"{name}: skipped ({e})")
            continue
        for method in methods:
            attempts = [("pyfastpeft", lambda: run_ours(task, method, steps, progress, backend))]
            if with_peft:
                attempts.append(("peft", lambda: run_peft(task, method, steps, progress)))
            for impl, fn in attempts:
                torch.manual_seed(seed)
                try:
                    r = fn()
                except Exception as e:  # noqa: BLE001 - one failing run must not hide the others
                    r = Run(name, method, impl, status=f"FAILED: {type(e).__name__}: {str(e)[:160]}")
                if r is None:
                    continue
                result["rows"].append(r.row())
                result["curves"][f"{name}/{method}/{impl}"] = r.losses
                if r.selected:
                    result.setdefault("selected", {})[f"{name}/{method}/{impl}"] = r.selected
        lora = {r["impl"]: r for r in result["rows"] if r["model"] == name and r["method"] == "lora"}
        for r in result["rows"]:  # gated LoRA's loss next to LoRA's, in the note
            if r["model"] == name and r["method"] == "gated_lora" and r["impl"] in lora \
                    and lora[r["impl"]].get("loss_last") is not None and r["status"] == "ok":
                r["note"] += f"; LoRA's last loss {lora[r['impl']]['loss_last']:.3f}"
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small models, 6 steps (under a minute on a small CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 6 quick, 30 full)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {','.join(MODELS)}")
    p.add_argument("--methods", default=None, help="comma list (default: every method available here)")
    p.add_argument("--backend", default=None, choices=["cuda", "triton", "torch"],
                   help="pin the pyfastpeft backend (default: auto)")
    p.add_argument("--no-peft", action="store_true", help="do not run PEFT for comparison")
    p.add_argument("--out", default=None,
                   help="output directory (default: ./pyfastpeft-results/demo, git-ignored; the committed "
                        "benchmarks/results/demo-cpu-quick changes only when named here)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, where tiny GEMMs only lose to thread "
                        "hand-offs, else torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pyfastpeft.families import methods as _methods

    METHODS = _methods()

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            print(f"pyfastpeft demo: unknown model {m!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
            return 2
    avail = list(METHODS)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else avail
    for m in methods:
        if m not in METHODS:
            print(f"pyfastpeft demo: unknown method {m!r}; choose from {', '.join(METHODS)}", file=sys.stderr)
            return 2
    steps = args.steps if args.steps is not None else (6 if args.quick else 30)
    if steps < 2:
        print("pyfastpeft demo: --steps must be >= 2 (the first step is a warm-up)", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if args.quick else torch.get_num_threads())
    if threads < 1:
        print("pyfastpeft demo: --threads must be >= 1", file=sys.stderr)
        return 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _main(args, argv, models, methods, steps, threads)
    finally:
        torch.set_num_threads(before)  # callers in the same process keep their setting


def _main(args: argparse.Namespace, argv: Sequence[str], models: Sequence[str], methods: Sequence[str], steps: int,
          threads: int) -> int:
    print(f"pyfastpeft demo: {', '.join(models)} x {', '.join(methods)}, {steps} steps each, CPU ({threads} "
          f"thread{'s' if threads > 1 else ''}), synthetic data" + ("" if args.no_peft else
                                                                   "; PEFT where it has the method"), flush=True)
    result = run(models, methods, quick=args.quick, steps=steps, progress=not args.no_progress,
                 backend=args.backend, with_peft=not args.no_peft, seed=args.seed, argv=list(argv))
    paths = write(result, out_dir(args.out))
    print(summary_table(result["rows"]))
    print("step ms: median of steps 2.. (forward + backward + AdamW), measured on this CPU; saved MiB: bytes "
          "autograd keeps for backward in one training forward (pfp.perf.saved_bytes, whole model)")
    for n in result["notes"]:
        print(f"note: {n}")
    for kind, p in paths.items():
        if p is not None:
            print(f"wrote {p}")
    if not args.out:
        print(f"results are in {out_dir(None)}/ (untracked, git-ignored); --out DIR writes elsewhere")
    return 1 if any(r["status"] != "ok" for r in result["rows"]) else 0


def out_dir(out: Optional[str]) -> Path:
    """Where the demo writes: ``out``, else ``./pyfastpeft-results/demo`` (git-ignored)."""
    from pyfastpeft.tools.bench import DEFAULT_OUT_DIR

    return Path(out) if out else DEFAULT_OUT_DIR / "demo"
