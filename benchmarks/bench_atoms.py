"""Filter-atom conv benchmark: our one-conv layer vs the frozen conv and vs the seed code's two-conv formulation.

Workloads (``benchmarks/shapes.py``, ``docs/performance.md`` section 3): ResNet-50 3x3 convs and a ConvNeXt
depthwise 7x7, m in {4, 9}, recursive m1 = 3. Per workload, one run measures:

* saved-for-backward bytes per sample (exact, ``pfp.perf.saved_bytes``, bf16): the slope between batch 1 and 2,
  so weight-sized saved tensors (the seed's materialised delta weight) are reported apart as "fixed" bytes;
* modeled H100 fwd+bwd time (``pfp.perf.count`` + ``pfp.perf.roofline``, a roofline MODEL, bf16, batch 64,
  channels_last): ours (declared Triton-path launches) / frozen conv (fwd + input grad) and seed / ours;
* CPU wall-clock fwd+bwd (fp32, batch 4, channels_last, interleaved rounds, medians, one thread): seed / ours
  (``torch`` backend, ``PYFASTPEFT_STRICT=1``) and ours / frozen, after a correctness gate against the fp64
  reference (output and atom gradient);
* trainable parameters of timm ResNet-50 and ConvNeXt-T (built from config, nothing downloaded) with atoms in
  every 3x3 / depthwise conv.

    python benchmarks/bench_atoms.py [--quick] [--rounds 5] [--json benchmarks/results/atoms-cpu.json]

Writes ``pyfastpeft-results/atoms-cpu.json`` (git-ignored) unless ``--json`` names a file; the committed
``benchmarks/results/atoms-cpu.json`` changes only when named. Every CPU timing keeps its spread
(``cpu_spread_*`` = (p80 - p20) / median); a ratio that uses a timing with spread > 20 % is flagged
(``<ratio>_noisy``, ``(x)!`` in the table): not a result. No timing assertions anywhere: the numbers are evidence.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import ATOM_BATCH, ATOM_CONFIGS, ATOM_CONV_SHAPES  # noqa: E402

import pyfastpeft as pfp  # noqa: E402
from pyfastpeft import testing  # noqa: E402
from pyfastpeft.tools import perf  # noqa: E402
from pyfastpeft.core.table import table  # noqa: E402
from pyfastpeft.tools import timing  # noqa: E402
from pyfastpeft.tools.bench import results_dir  # noqa: E402
from pyfastpeft.tools.timing import time_interleaved  # noqa: E402
from pyfastpeft.atoms.torch_impl import seed_atom_conv2d  # noqa: E402
from pyfastpeft.nn import AtomConv2d  # noqa: E402
from pyfastpeft.atoms.reference import atom_conv2d_ref  # noqa: E402


class SeedAtomConv2d(nn.Module):
    """The seed code's formulation on the same weights and atoms as ``layer``: conv(x, W) + conv(x, ΔW)."""

    def __init__(self, layer: AtomConv2d):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        L, b = self.layer, self.layer.base_layer
        return seed_atom_conv2d(x, b.weight, b.bias, L.atom_coeff, L.current_atoms(), b.stride, b.padding, b.dilation,
                                b.groups)


def build(cin, cout, k, groups, m, m1, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=groups > 1)  # ConvNeXt dw convs have bias
    layer = AtomConv2d.from_conv(conv, m, sub_atoms=m1)
    with torch.no_grad():  # non-zero atoms: every path does real work
        for p in layer.parameters():
            if p.requires_grad and not p.abs().sum():
                p.normal_(0, 0.1)
    layer = layer.to(dtype)
    frozen = layer.base_layer
    return frozen, layer, SeedAtomConv2d(layer)


def _x(batch, cin, hw, dtype, device="cpu"):
    x = torch.randn(batch, cin, hw, hw, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def saved_per_sample(mod, cin, hw, dtype):
    b1 = perf.saved_bytes(mod, _x(1, cin, hw, dtype)).total_bytes
    b2 = perf.saved_bytes(mod, _x(2, cin, hw, dtype)).total_bytes
    return b2 - b1, 2 * b1 - b2  # (per sample, fixed)


def modeled(mod, cin, hw, batch):
    x = _x(batch, cin, hw, torch.bfloat16, "meta")
    rl = perf.roofline(perf.count(mod, x, mode="fwd+bwd"))
    return rl.total_s


def _step(mod, x, gy, params):
    y = mod(x)
    torch.autograd.backward(y, gy)
    for p in params:
        p.grad = None
    x.grad = None


def wall_clock(mods, cin, hw, batch, rounds):
    """``{name: Timing}`` (seconds) of one fwd+bwd step per module: one warm-up each, then ``rounds``
    interleaved rounds (machine noise hits every provider alike)."""
    x = _x(batch, cin, hw, torch.float32)
    with torch.no_grad():
        shape = mods["frozen"](x).shape
    gy = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in mods.items()}
    res = time_interleaved({k: partial(_step, m, x, gy, params[k]) for k, m in mods.items()}, warmup=1,
                           min_rounds=rounds, max_rounds=rounds)
    return res


def gate(layer, cin, hw, batch):
    """Our torch backend vs the fp64 reference at the CPU shape: output and atom gradient."""
    x = _x(batch, cin, hw, torch.float32)
    y = layer(x)
    gy = torch.randn_like(y)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, params, gy)
    b = layer.base_layer
    L64 = {k: v.detach().double() for k, v in dict(layer.named_parameters()).items()}
    p64 = [L64[n].requires_grad_() for n, p in layer.named_parameters() if p.requires_grad]
    atoms64 = p64[0] if layer.sub_atoms == 0 else torch.einsum("lji,ljpq->ijpq", *p64)
    y64 = atom_conv2d_ref(x.detach().double(), b.weight.double(), None if b.bias is None else b.bias.double(),
                          layer.atom_coeff.double(), atoms64, b.stride, b.padding, b.dilation, b.groups)
    g64 = torch.autograd.grad(y64, p64, gy.double())
    kk = b.kernel_size[0] * b.kernel_size[1]
    v = testing.compare(y, y64, reduction=b.in_channels // b.groups * kk)
    bad = [] if v.ok else [f"y {v}"]
    for g, w in zip(grads, g64):
        v = testing.compare(g, w, reduction=batch * hw * hw * b.out_channels * b.in_channels // b.groups * kk)
        if not v.ok:
            bad.append(f"grad {v}")
    return "; ".join(bad) or None


def trainable_counts():
    import timm
    rows = []

    def pred(name, m):
        return isinstance(m, nn.Conv2d) and (m.kernel_size == (3, 3) or (m.groups > 1 and m.groups == m.in_channels))

    from pyfastpeft.atoms.modules import inject_conv_atoms
    for arch in ("resnet50", "convnext_tiny"):
        for m, m1 in ATOM_CONFIGS:
            model = timm.create_model(arch, pretrained=False)
            total = sum(p.numel() for p in model.parameters())
            names = inject_conv_atoms(model, m, sub_atoms=m1, predicate=pred)
            train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append(dict(model=arch, m=m, m1=m1, layers=len(names), trainable=train, total=total,
                             percent=100.0 * train / total))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="first two conv shapes only")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(results_dir(None) / "atoms-cpu.json"),
                    help="results JSON (default: pyfastpeft-results/atoms-cpu.json, git-ignored; name "
                         "benchmarks/results/atoms-cpu.json to update the committed file)")
    ap.add_argument("--no-params", action="store_true", help="skip the timm parameter counts")
    args = ap.parse_args(argv)
    os.environ["PYFASTPEFT_STRICT"] = "1"
    torch.set_num_threads(args.threads)
    shapes = ATOM_CONV_SHAPES[:2] if args.quick else ATOM_CONV_SHAPES
    rows = []
    for label, cin, cout, hw, k, groups in shapes:
        for m, m1 in ATOM_CONFIGS:
            t0 = time.time()
            frozen, layer, seed = build(cin, cout, k, groups, m, m1, torch.bfloat16)
            row = dict(workload=label, m=m, m1=m1)
            s_f, _ = saved_per_sample(frozen, cin, hw, torch.bfloat16)
            s_o, fx_o = saved_per_sample(layer, cin, hw, torch.bfloat16)
            s_s, fx_s = saved_per_sample(seed, cin, hw, torch.bfloat16)
            row.update(saved_frozen=s_f, saved_ours=s_o, saved_seed=s_s, saved_fixed_ours=fx_o, saved_fixed_seed=fx_s)
            B = ATOM_BATCH["cuda"]
            t_f, t_o, t_s = (modeled(mod, cin, hw, B) for mod in (frozen, layer, seed))
            row.update(h100_us_frozen=t_f * 1e6, h100_us_ours=t_o * 1e6, h100_us_seed=t_s * 1e6,
                       h100_ours_over_frozen=t_o / t_f, h100_seed_over_ours=t_s / t_o)
            frozen, layer, seed = build(cin, cout, k, groups, m, m1, torch.float32)
            layer.backend = "torch"
            bad = gate(layer, cin, hw, ATOM_BATCH["cpu"])
            if bad:
                row.update(cpu_gate=bad)
            else:
                t = wall_clock({"frozen": frozen, "ours": layer, "seed": seed}, cin, hw, ATOM_BATCH["cpu"],
                               args.rounds)
                row.update(cpu_ms_frozen=t["frozen"].median * 1e3, cpu_ms_ours=t["ours"].median * 1e3,
                           cpu_ms_seed=t["seed"].median * 1e3,
                           cpu_seed_over_ours=t["seed"].median / t["ours"].median,
                           cpu_ours_over_frozen=t["ours"].median / t["frozen"].median,
                           cpu_spread_frozen=t["frozen"].spread, cpu_spread_ours=t["ours"].spread,
                           cpu_spread_seed=t["seed"].spread,
                           cpu_seed_over_ours_noisy=t["seed"].noisy or t["ours"].noisy,
                           cpu_ours_over_frozen_noisy=t["ours"].noisy or t["frozen"].noisy)
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    params = [] if args.no_params else trainable_counts()
    for r in params:
        print(json.dumps(r), flush=True)
    meta = dict(torch=torch.__version__, python=platform.python_version(),
                cpu=platform.processor() or platform.machine(),
                threads=args.threads, rounds=args.rounds, pyfastpeft=pfp.__version__,
                note="h100_* are a roofline MODEL (docs/performance.md), not measurements")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows, params=params), f, indent=1)
    print(markdown(rows, params))
    print(f"\nwrote {args.json}")


def _ratio_x(value: float, flagged: bool) -> str:
    """``1.85x``, or ``(1.85x)!`` when the ratio uses a timing with spread > 20 % (not a result)."""
    return f"({value:.2f}x){timing.FLAG}" if flagged else f"{value:.2f}x"


def markdown(rows, params) -> str:
    body = []
    flagged = False
    for r in rows:
        if "cpu_seed_over_ours" in r:
            f1, f2 = bool(r.get("cpu_seed_over_ours_noisy")), bool(r.get("cpu_ours_over_frozen_noisy"))
            flagged = flagged or f1 or f2
            spreads = " / ".join(timing.spread_text(r.get(f"cpu_spread_{k}")) for k in ("frozen", "ours", "seed"))
            cpu = [_ratio_x(r["cpu_seed_over_ours"], f1), _ratio_x(r["cpu_ours_over_frozen"], f2), spreads]
        else:
            cpu = [f"gate failed: {r.get('cpu_gate')}", "-", "-"]
        saved = f"{r['saved_frozen'] / 1e6:.2f} / {r['saved_ours'] / 1e6:.2f} / {r['saved_seed'] / 1e6:.2f} MB"
        body.append([r["workload"], r["m"], r["m1"], saved, f"{r['h100_ours_over_frozen']:.2f}x",
                     f"{r['h100_seed_over_ours']:.2f}x", *cpu])
    out = [table(["workload", "m", "m1", "saved B/sample frozen / ours / seed", "modeled H100 ours/frozen",
                  "modeled seed/ours", "CPU seed/ours", "CPU ours/frozen", "CPU spread frozen / ours / seed"], body,
                 markdown=True)]
    if flagged:
        out += ["", timing.FOOTNOTE]
    if params:
        out += ["", table(["model", "m", "m1", "atom layers", "trainable", "total", "%"],
                          [[p["model"], p["m"], p["m1"], p["layers"], f"{p['trainable']:,}", f"{p['total']:,}",
                            f"{p['percent']:.4f}"] for p in params], markdown=True)]
    return "\n".join(out)


if __name__ == "__main__":
    main()
