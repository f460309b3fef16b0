"""LoRA's modeled fwd+bwd time: the default path, and the fused Triton GEMM over its efficiency (a MODEL, no GPU).

    python benchmarks/model_sensitivity.py            # markdown table to stdout

For each LoRA layer of the workloads (bf16, r = 16, the GPU token counts), ratios to the frozen layer of:
the default path (the ``triton`` backend's ``vendor`` variant: rank-r Triton kernels write into y and dx, and
cuBLAS adds the big GEMMs onto them as their C operand; no assumption about our GEMMs' efficiency); the
``fused`` variant (fused Triton GEMMs) with our GEMMs at e = 0.65 … 1.0 of cuBLAS's rate; the torch backend
on a GPU (cuBLAS for every GEMM); PEFT's layer (when ``peft`` is installed); and the break-even efficiency
below which the default path is faster than the fused one (``pfp.perf.break_even``). Nothing is timed:
``pfp.perf.count`` on meta tensors and ``pfp.perf.roofline`` (docs/performance.md §1.2).
"""
from __future__ import annotations

import torch

from pyfastpeft.tools import bench, perf
from pyfastpeft.core.table import table

EFFICIENCIES = (0.65, 0.75, 0.85, 0.9, 1.0)


def _peft_s(gw) -> float | None:
    try:
        fn, args = bench._fn_for("peft", bench._meta_inputs(gw, torch.bfloat16))
        return perf.roofline(perf.count(fn, *args, mode="fwd+bwd")).time()
    except Exception:  # noqa: BLE001  (peft not installed, or its layer cannot run on meta)
        return None


def rows() -> list[list[str]]:
    out = []
    for w in bench.lora_workloads("cuda"):
        if w.R != 16:
            continue
        gw = bench.LinearWorkload(w.model, w.gpu_M, w.K, w.N, w.R, w.gpu_M)
        fn, args = bench._fn_for("frozen", bench._meta_inputs(gw, torch.bfloat16))
        frozen = perf.roofline(perf.count(fn, *args, mode="fwd+bwd")).time()
        vendor = perf.roofline(bench.triton_counts(perf, w, "vendor")).time()
        fused = bench.triton_counts(perf, w, "fused")
        torch_path = perf.roofline(bench._cublas_path_counts(perf, w)).time()
        peft = _peft_s(gw)
        be = perf.break_even(fused, vendor)
        out.append([w.name, f"{vendor / frozen:.3f}"]
                   + [f"{perf.roofline(fused, triton_efficiency=e).time() / frozen:.2f}" for e in EFFICIENCIES]
                   + [f"{torch_path / frozen:.2f}", "n/a" if peft is None else f"{peft / frozen:.2f}",
                      "n/a" if peft is None else f"{peft / vendor:.2f}",
                      "never" if be is None else f"{be:.2f}"])
    return out


def main() -> None:
    print("LoRA fwd+bwd / frozen, modeled H100 bf16 (a MODEL, not a measurement)\n")
    print(table(["layer", "default (vendor)"] + [f"fused e = {e:g}" for e in EFFICIENCIES]
                + ["torch (cuBLAS)", "PEFT", "PEFT / default", "fused break-even e"], rows(), markdown=True))


if __name__ == "__main__":
    main()
