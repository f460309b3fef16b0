"""LoRA's modeled fwd+bwd time over our Triton GEMMs' efficiency, against the cuBLAS path (a MODEL, no GPU).

    python benchmarks/model_sensitivity.py            # markdown table to stdout

For each LoRA layer of the workloads (bf16, r = 16, the GPU token counts), the ratio to the frozen layer of
the fused Triton path with our GEMMs at e = 0.65 … 1.0 of cuBLAS's rate, of the cuBLAS path (the torch backend
on a GPU), and the break-even efficiency below which the cuBLAS path is faster (``pfp.perf.break_even``).
Nothing is timed: ``pfp.perf.count`` on meta tensors and ``pfp.perf.roofline`` (docs/performance.md §1.2).
"""
from __future__ import annotations

import torch

from pyfastpeft.tools import bench, perf
from pyfastpeft.core.table import table

EFFICIENCIES = (0.65, 0.75, 0.85, 0.9, 1.0)


def rows() -> list[list[str]]:
    out = []
    for w in bench.lora_workloads("cuda"):
        if w.R != 16:
            continue
        gw = bench.LinearWorkload(w.model, w.gpu_M, w.K, w.N, w.R, w.gpu_M)
        fn, args = bench._fn_for("frozen", bench._meta_inputs(gw, torch.bfloat16))
        frozen = perf.roofline(perf.count(fn, *args, mode="fwd+bwd")).time()
        fn, args = bench._fn_for("pyfastpeft", bench._meta_inputs(gw, torch.bfloat16), backend="triton")
        ours = perf.count(fn, *args, mode="fwd+bwd")
        cublas = perf.roofline(bench._cublas_path_counts(perf, w)).time()
        be = perf.break_even(ours, cublas)
        out.append([w.name] + [f"{perf.roofline(ours, triton_efficiency=e).time() / frozen:.2f}" for e in EFFICIENCIES]
                   + [f"{cublas / frozen:.2f}", "never" if be is None else f"{be:.2f}"])
    return out


def main() -> None:
    print("LoRA fwd+bwd / frozen, modeled H100 bf16 (a MODEL, not a measurement)\n")
    print(table(["layer"] + [f"Triton e = {e:g}" for e in EFFICIENCIES] + ["cuBLAS path", "break-even e"], rows(),
                markdown=True))


if __name__ == "__main__":
    main()
