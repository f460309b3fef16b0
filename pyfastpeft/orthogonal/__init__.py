"""Orthogonal fine-tuning: batched Cayley / Cayley-Neumann, block-diagonal OFT, PSOFT (``docs/orthogonal.md``).

The family's declaration for the library's table of families (:mod:`pyfastpeft.families`).
"""
from torch import nn

from pyfastpeft.core.family import Builder, Family, Method, Op
from pyfastpeft.orthogonal import cayley as _cayley
from pyfastpeft.orthogonal import oft_linear as _oft
from pyfastpeft.orthogonal import psoft_linear as _psoft
from pyfastpeft.orthogonal.modules import OFTLinear, PSOFTLinear
from pyfastpeft.orthogonal.reference import cayley_ref, oft_linear_ref, psoft_linear_ref

FAMILY = Family(
    name="orthogonal",
    title="Cayley, OFT, PSOFT",
    doc="docs/orthogonal.md",
    ops=(Op("cayley", _cayley.cayley, _cayley.explain_args, cayley_ref),
         Op("oft_linear", _oft.oft_linear, _oft.explain_args, oft_linear_ref),
         Op("psoft_linear", _psoft.psoft_linear, _psoft.explain_args, psoft_linear_ref)),
    modules=(OFTLinear, PSOFTLinear),
    methods=(
        Method("oft", (Builder(nn.Linear, OFTLinear, "from_linear"),), peft_layers=(("oft", "Linear"), ("oft", "Conv2d")),
               demo=dict(block_size=8), peft_config=("OFTConfig", dict(oft_block_size=8, r=0))),
        Method("psoft", (Builder(nn.Linear, PSOFTLinear, "from_linear"),), peft_layers=(("psoft", "Linear"),),
               demo=dict(r=8, alpha=16), peft_config=("PsoftConfig", dict(r=8, psoft_alpha=16))),
    ),
    checks="pyfastpeft.orthogonal.checks:checks",
    twins="pyfastpeft.orthogonal.twin:TWIN_CHECKS",
    costs=("pyfastpeft.orthogonal.cayley:COSTS", "pyfastpeft.orthogonal.oft_linear:COSTS",
           "pyfastpeft.orthogonal.psoft_linear:COSTS"),
    kernels=("pyfastpeft.triton_kernels.orthogonal.cayley", "pyfastpeft.triton_kernels.orthogonal.oft_linear"),
    benchmarks=("benchmarks/bench_orthogonal.py",),
)
