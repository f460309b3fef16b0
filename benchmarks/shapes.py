"""Benchmark workloads: re-exported from :mod:`pyfastpeft.tools.bench`, the one source of truth.

Real model dimensions (``docs/performance.md`` section 3): Llama-3-8B projections at M = 8192 tokens and
ViT-B/16 at M = 64 * 197, LoRA ranks 8 / 16 / 64; on a CPU, M / 16 and fp32.
"""
from pyfastpeft.tools.bench import (  # noqa: F401
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

# Filter-atom convs (docs/performance.md section 3): ResNet-50 3x3 convs and a ConvNeXt depthwise 7x7, batch 64
# at 224 px, channels_last, bf16 on GPU; on a CPU batch 64 / 16 = 4, fp32. (label, C_in, C_out, H=W, k, groups).
ATOM_CONV_SHAPES = [
    ("resnet50 3x3 56^2 64->64", 64, 64, 56, 3, 1),
    ("resnet50 3x3 28^2 128->128", 128, 128, 28, 3, 1),
    ("resnet50 3x3 14^2 256->256", 256, 256, 14, 3, 1),
    ("resnet50 3x3 7^2 512->512", 512, 512, 7, 3, 1),
    ("convnext dw7x7 56^2 C128", 128, 128, 56, 7, 128),
]
ATOM_CONFIGS = [(4, 0), (9, 0), (4, 3)]  # (num_atoms m, sub_atoms m1): m in {4, 9}, recursive m1 = 3
ATOM_BATCH = {"cuda": 64, "cpu": 4}

if __name__ == "__main__":
    for dev in ("cuda", "cpu"):
        print(f"{dev}:")
        for w in lora_workloads(dev):
            print(f"  {w.label}")
