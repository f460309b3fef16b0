"""Benchmark workloads: re-exported from :mod:`pyfastpeft.bench`, the one source of truth.

Real model dimensions (``specs/performance.md`` section 3): Llama-3-8B projections at M = 8192 tokens and
ViT-B/16 at M = 64 * 197, LoRA ranks 8 / 16 / 64; on a CPU, M / 16 and fp32.
"""
from pyfastpeft.bench import (  # noqa: F401
    CPU_M_DIVISOR,
    LLAMA3_8B_SHAPES,
    LLAMA3_8B_TOKENS,
    LORA_RANKS,
    MODELS,
    VIT_B16_SHAPES,
    VIT_B16_TOKENS,
    LinearWorkload,
    lora_workloads,
)

__all__ = ["CPU_M_DIVISOR", "LLAMA3_8B_SHAPES", "LLAMA3_8B_TOKENS", "LORA_RANKS", "MODELS", "VIT_B16_SHAPES",
           "VIT_B16_TOKENS", "LinearWorkload", "lora_workloads"]

if __name__ == "__main__":
    for dev in ("cuda", "cpu"):
        print(f"{dev}:")
        for w in lora_workloads(dev):
            print(f"  {w.label}")
