"""LoRA and token-selective (gated) LoRA: ``docs/token_selective.md``.

The family's ops, layers, references, check rows, twin checks, cost tables, kernels and benchmarks, as
one :class:`~pyfastpeft.core.family.Family` (the library's table of families: :mod:`pyfastpeft.families`).
"""
from torch import nn

from pyfastpeft.core.family import Builder, Family, Method, Op
from pyfastpeft.lora import gated_lora_linear as _gated
from pyfastpeft.lora import lora_linear as _lora
from pyfastpeft.lora.modules import GatedLoRALinear, LoRAConv2d, LoRALinear, gate_loss
from pyfastpeft.lora.reference import gated_lora_linear_ref, lora_linear_ref

FAMILY = Family(
    name="lora",
    title="LoRA, token-selective LoRA",
    doc="docs/token_selective.md",
    ops=(Op("lora_linear", _lora.lora_linear, _lora.explain_args, lora_linear_ref),
         Op("gated_lora_linear", _gated.gated_lora_linear, _gated.explain_args, gated_lora_linear_ref)),
    modules=(LoRALinear, GatedLoRALinear, LoRAConv2d),
    methods=(
        Method("lora", (Builder(nn.Linear, LoRALinear, "from_linear"), Builder(nn.Conv2d, LoRAConv2d, "from_conv")),
               peft_layers=(("lora", "Linear"), ("lora", "Conv2d")),
               demo=dict(r=8, alpha=16), peft_config=("LoraConfig", dict(r=8, lora_alpha=16))),
        Method("gated_lora", (Builder(nn.Linear, GatedLoRALinear, "from_linear"),), demo=dict(r=8, alpha=16)),
    ),
    exports={"gate_loss": gate_loss},
    checks="pyfastpeft.lora.checks:checks",
    twins="pyfastpeft.lora.twin:TWIN_CHECKS",
    costs=("pyfastpeft.lora.lora_linear:COSTS", "pyfastpeft.lora.gated_lora_linear:COSTS"),
    kernels=("pyfastpeft.triton_kernels.lora.lora_linear", "pyfastpeft.triton_kernels.lora.lora_rank",
             "pyfastpeft.triton_kernels.lora.gated_lora_linear"),
    benchmarks=("benchmarks/bench_lora_linear.py", "benchmarks/bench_gated_lora.py"),
)
