"""Filter-atom convolution and linear layers, recursive atoms (``docs/atoms.md``).

The family's declaration for the library's table of families (:mod:`pyfastpeft.families`).
"""
from torch import nn

from pyfastpeft.atoms import ops as _ops
from pyfastpeft.atoms.modules import AtomConv2d, AtomLinear
from pyfastpeft.atoms.reference import atom_conv2d_ref, atom_linear_ref
from pyfastpeft.core.family import Builder, Family, Method, Op

FAMILY = Family(
    name="atoms",
    title="filter atoms",
    doc="docs/atoms.md",
    ops=(Op("atom_conv2d", _ops.atom_conv2d, _ops.explain_args, atom_conv2d_ref),
         Op("atom_linear", _ops.atom_linear, _ops.explain_linear_args, atom_linear_ref)),
    modules=(AtomConv2d, AtomLinear),
    methods=(
        Method("atoms", (Builder(nn.Conv2d, AtomConv2d, "from_conv"), Builder(nn.Linear, AtomLinear, "from_linear")),
               demo=dict(num_atoms=4, block=8), demo_extra_targets={"vit": ("patch_embed.proj",)}),
    ),
    checks="pyfastpeft.atoms.checks:checks",
    twins="pyfastpeft.atoms.twin:TWIN_CHECKS",
    costs=("pyfastpeft.atoms.ops:COSTS",),
    kernels=("pyfastpeft.triton_kernels.atoms.atoms",),
    benchmarks=("benchmarks/bench_atoms.py",),
)
