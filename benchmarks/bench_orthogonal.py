"""Orthogonal family benchmark: batched Cayley, OFT and PSOFT layers vs the frozen layer and vs PEFT 0.21.

Per ``docs/performance.md``; one run measures, per workload:

* **Cayley alone**, (G, b) in {(128, 32), (64, 64), (16, 128), (1, 256)}, fwd+bwd: ours (exact; Neumann T=5)
  vs ``torch.linalg.solve`` (PEFT OFT's exact path: skew build + solve) and vs PEFT's Neumann ``bmm`` loop
  (``OFTRotationModule._cayley_batch``). Modeled H100 (roofline MODEL of every launch; ours = the declared
  Triton launch, or the torch path where Triton does not run) and CPU wall-clock (fp32, interleaved rounds,
  medians, ``torch`` backend: on CPU ours is batched ``linalg.inv``, not the Triton kernel).
* **OFT** (b in {16, 32, 64}, Neumann T=5 and exact) and **PSOFT** (r in {32, 256}, exact and Neumann)
  layers: saved-for-backward bytes per token (exact, fp32, ``pfp.perf.saved_bytes``), modeled H100 fwd+bwd
  (bf16, M = 8192 Llama / 12608 ViT tokens) as ratios ours / frozen and PEFT / ours, and CPU wall-clock
  (fp32, M / 16) as the same ratios. "frozen" is the base ``nn.Linear`` with a frozen weight (forward +
  input gradient). OFT's modeled path is the CUDA static default: the Triton rotation and diagonal-block
  kernels (memory-bound, modeled at the bandwidth; Triton efficiency 0.75 applies only to FLOPs of our own
  launches, and no GEMM of ours is used) with both GEMMs on cuBLAS; on CPU ours is the torch backend.

    python benchmarks/bench_orthogonal.py [--quick] [--rounds 5] [--only oft] [--json benchmarks/results/orthogonal-cpu.json]

Every CPU timing keeps its spread ((p80 - p20) / median, ``cpu_spread``); a CPU ratio that uses a timing with
spread > 20 % is flagged (``<ratio>_noisy``, ``(x)!`` in the printed lines): not a result. Without ``--json``
nothing is written. No timing assertions: the numbers are evidence. The modeled numbers are a model, labelled so.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyfastpeft as pfp  # noqa: E402
from pyfastpeft.tools import perf  # noqa: E402
from pyfastpeft.tools import timing  # noqa: E402
from pyfastpeft.tools.timing import time_interleaved  # noqa: E402
from pyfastpeft.nn import OFTLinear, PSOFTLinear  # noqa: E402
from pyfastpeft.orthogonal.reference import cayley_ref  # noqa: E402

warnings.filterwarnings("ignore")
CAYLEY_SHAPES = [(128, 32), (64, 64), (16, 128), (1, 256)]
# (name, K, N, M_gpu): Llama-3-8B q/o projection and a ViT-B MLP up-projection; CPU uses M / 16
LAYER_SHAPES = [("llama 4096->4096", 4096, 4096, 8192), ("vit 768->3072", 768, 3072, 64 * 197)]


def _timings(fns: dict, rounds: int) -> dict:
    """Interleaved rounds (every provider once per round), ``{name: Timing}`` in seconds; one warm-up each."""
    return time_interleaved(fns, warmup=1, min_rounds=rounds, max_rounds=rounds)


def _r(value: float, flagged: bool, suffix: str = "") -> str:
    """A printed CPU ratio: ``1.34x``, or ``(1.34x)!`` when it uses a timing with spread > 20 %."""
    text = f"{value:.2f}{suffix}"
    return f"({text}){timing.FLAG}" if flagged else text


def _modeled(fn, *args) -> float:
    return perf.roofline(perf.count(fn, *args, mode="fwd+bwd")).total_s


# --------------------------------------------------------------------------------------------- Cayley
def _peft_rot(b, G, neumann):
    from peft.tuners.oft.layer import OFTRotationModule
    return OFTRotationModule(G, b * (b - 1) // 2, b, G * b, use_cayley_neumann=neumann, num_cayley_neumann_terms=5)


def cayley_rows(rounds: int) -> list[dict]:
    rows = []
    for G, b in CAYLEY_SHAPES:
        n = b * (b - 1) // 2
        v = (torch.randn(G, n) * 0.05).requires_grad_()
        peft_exact, peft_neu = _peft_rot(b, G, False), _peft_rot(b, G, True)
        fns = {
            "ours-exact": lambda t: pfp.cayley(t, b, method="exact"),
            "linalg.solve": lambda t: peft_exact._cayley_batch(t, b, False),
            "ours-neumann": lambda t: pfp.cayley(t, b, method="neumann", terms=5),
            "peft-neumann": lambda t: peft_neu._cayley_batch(t, b, True, 5),
        }
        # correctness gate: every provider vs the fp64 reference (minus convention for exact, plus series)
        for k, f in fns.items():
            R = f(v).detach().double()
            want = cayley_ref(v.detach().double(), b, method="neumann" if "neumann" in k else "exact")
            assert (R - want).abs().max().item() < 1e-4, (k, G, b)
        gR = torch.randn(G, b, b)

        def step(f):
            return lambda: torch.autograd.grad(f(v), v, gR)

        tm = _timings({k: step(f) for k, f in fns.items()}, rounds)
        cpu = {k: t.median for k, t in tm.items()}
        mod = {k: _modeled(f, v) for k, f in fns.items()}
        rows.append(dict(G=G, b=b, cpu_ms={k: t * 1e3 for k, t in cpu.items()},
                         cpu_spread={k: t.spread for k, t in tm.items()},
                         h100_us={k: t * 1e6 for k, t in mod.items()},
                         exact_speedup_cpu=cpu["linalg.solve"] / cpu["ours-exact"],
                         exact_speedup_cpu_noisy=tm["linalg.solve"].noisy or tm["ours-exact"].noisy,
                         exact_speedup_h100=mod["linalg.solve"] / mod["ours-exact"],
                         neumann_speedup_cpu=cpu["peft-neumann"] / cpu["ours-neumann"],
                         neumann_speedup_cpu_noisy=tm["peft-neumann"].noisy or tm["ours-neumann"].noisy,
                         neumann_speedup_h100=mod["peft-neumann"] / mod["ours-neumann"]))
        r = rows[-1]
        exact_cpu = _r(r["exact_speedup_cpu"], r["exact_speedup_cpu_noisy"], "x")
        print(f"cayley G={G:4d} b={b:3d}  exact: CPU {exact_cpu}  "
              f"H100(model) {r['exact_speedup_h100']:.2f}x vs linalg.solve | neumann: CPU "
              f"{_r(r['neumann_speedup_cpu'], r['neumann_speedup_cpu_noisy'], 'x')}  H100(model) "
              f"{r['neumann_speedup_h100']:.2f}x vs PEFT", flush=True)
    return rows


# --------------------------------------------------------------------------------------------- layers
def _peft_layer(kind, base, opts):
    import peft

    model = nn.Sequential(base)
    if kind == "oft":
        cfg = peft.OFTConfig(target_modules=["0"], r=0, init_weights=False, **opts)
    else:
        cfg = peft.PsoftConfig(target_modules=["0"], init_weights=False, psoft_svd="lowrank",
                               psoft_svd_lowrank_niter=1, **opts)
    return peft.get_peft_model(model, cfg).base_model.model[0]


def _layer_configs(quick):
    oft = [("OFT b=%d %s" % (b, m), "oft", dict(oft_block_size=b, use_cayley_neumann=m == "neumann"))
           for b in (16, 32, 64) for m in ("neumann", "exact")]
    psoft = [("PSOFT r=%d %s" % (r, m), "psoft", dict(r=r, psoft_alpha=r, use_cayley_neumann=m == "neumann"))
             for r in (32, 256) for m in ("exact", "neumann")]
    if quick:
        oft, psoft = [oft[2], oft[3]], [psoft[2], psoft[3]]
    return oft + psoft


class _Frozen(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def layer_rows(rounds: int, quick: bool, only: str = "all") -> list[dict]:
    rows = []
    for sname, K, N, M in LAYER_SHAPES if not quick else LAYER_SHAPES[1:]:
        torch.manual_seed(0)
        base = nn.Linear(K, N)
        base.requires_grad_(False)
        for name, kind, opts in _layer_configs(quick):
            if only not in ("all", kind):
                continue
            t0 = time.perf_counter()
            pl = _peft_layer(kind, copy.deepcopy(base), opts)
            ours = (OFTLinear if kind == "oft" else PSOFTLinear).from_peft(pl)
            frozen = _Frozen(ours.base_layer)
            row = dict(shape=sname, K=K, N=N, M_gpu=M, M_cpu=M // 16, config=name)
            # modeled H100, bf16 (meta device: no memory, no compute)
            mods = {}
            bf = {"frozen": copy.deepcopy(frozen).to(torch.bfloat16), "ours": _bf16_base(ours), "peft": _bf16_base(pl)}
            for pname, m16 in bf.items():
                x = torch.empty(M, K, dtype=torch.bfloat16, device="meta", requires_grad=True)
                mods[pname] = _modeled(m16, x)
            row["h100_us"] = {k: v * 1e6 for k, v in mods.items()}
            row["h100_ours_over_frozen"] = mods["ours"] / mods["frozen"]
            row["h100_peft_over_ours"] = mods["peft"] / mods["ours"]
            # saved bytes per token (exact; bf16 base and activations, fp32 adapter parameters as PEFT's
            # default autocast_adapter_dtype): the slope between 64 and 128 tokens, so parameter-sized saved
            # tensors (R, the packed generators) are reported apart as "fixed" bytes
            sb, fixed = {}, {}
            for p, m in bf.items():
                s64 = perf.saved_bytes(m, torch.randn(64, K, dtype=torch.bfloat16, requires_grad=True)).total_bytes
                s128 = perf.saved_bytes(m, torch.randn(128, K, dtype=torch.bfloat16, requires_grad=True)).total_bytes
                sb[p], fixed[p] = (s128 - s64) / 64, 2 * s64 - s128
            row["saved_bytes_per_token"], row["saved_bytes_fixed"] = sb, fixed
            # CPU wall-clock, fp32, M / 16, correctness gate first
            xc = torch.randn(M // 16, K, requires_grad=True)
            g = torch.randn(M // 16, N)
            with torch.no_grad():
                yo, yp = ours(xc), pl(xc)
            err = (yo - yp).norm() / yp.norm()
            assert err < 1e-5, (name, err.item())
            params = {"frozen": [xc], "ours": [xc] + [p for p in ours.parameters() if p.requires_grad],
                      "peft": [xc] + [p for p in pl.parameters() if p.requires_grad]}

            def step(m, ps):
                return lambda: torch.autograd.grad(m(xc), ps, g)

            tm = _timings({p: step(m, params[p]) for p, m in (("frozen", frozen), ("ours", ours), ("peft", pl))},
                          rounds)
            cpu = {k: t.median for k, t in tm.items()}
            row["cpu_ms"] = {k: v * 1e3 for k, v in cpu.items()}
            row["cpu_spread"] = {k: t.spread for k, t in tm.items()}
            row["cpu_ours_over_frozen"] = cpu["ours"] / cpu["frozen"]
            row["cpu_ours_over_frozen_noisy"] = tm["ours"].noisy or tm["frozen"].noisy
            row["cpu_peft_over_ours"] = cpu["peft"] / cpu["ours"]
            row["cpu_peft_over_ours_noisy"] = tm["peft"].noisy or tm["ours"].noisy
            rows.append(row)
            spreads = " / ".join(timing.spread_text(row["cpu_spread"][k]) for k in ("frozen", "ours", "peft"))
            print(f"{sname:17s} {name:20s} saved B/token frozen {sb['frozen']:.0f} ours {sb['ours']:.0f} "
                  f"peft {sb['peft']:.0f} | H100(model) ours/frozen {row['h100_ours_over_frozen']:.3f} "
                  f"peft/ours {row['h100_peft_over_ours']:.2f} | CPU ours/frozen "
                  f"{_r(row['cpu_ours_over_frozen'], row['cpu_ours_over_frozen_noisy'])} "
                  f"peft/ours {_r(row['cpu_peft_over_ours'], row['cpu_peft_over_ours_noisy'])} "
                  f"(spread {spreads})  ({time.perf_counter() - t0:.1f}s)", flush=True)
    return rows


def _bf16_base(layer):
    """A copy with a bf16 base layer; adapter parameters stay fp32 (PEFT's default autocast_adapter_dtype)."""
    m = copy.deepcopy(layer)
    base = m.get_base_layer() if hasattr(m, "get_base_layer") else m.base_layer
    base.to(torch.bfloat16)
    return m


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=("all", "oft", "psoft"), default="all",
                    help="layer rows of one method only, and no Cayley rows (never written with --json)")
    a = ap.parse_args(argv)
    if a.only != "all" and a.json:
        ap.error("--only measures part of the table: it is not written to --json")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__, threads=a.threads,
               note="h100_* are a roofline MODEL (pfp.perf.roofline), not measurements; cpu_* are medians")
    out["cayley"] = cayley_rows(a.rounds) if a.only == "all" else []
    out["layers"] = layer_rows(max(3, a.rounds // 2), a.quick, a.only)
    if any(r.get(k) for r in out["cayley"] + out["layers"] for k in r if k.endswith("_noisy")):
        print(timing.FOOTNOTE)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
