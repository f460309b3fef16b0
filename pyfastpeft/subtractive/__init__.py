"""Subtractive fine-tuning (SFP): replace a module by a linear filter block fitted by pseudo-inverse on
calibration activations, then train only that block (``docs/subtractive.md``).

``pfp.subtractive.fit`` / ``rank_modules`` are this package's public API; the family's declaration for the
library's table of families (:mod:`pyfastpeft.families`) is :data:`FAMILY`.
"""
from pyfastpeft.core.family import Family, Op
from pyfastpeft.subtractive import gram_accumulate as _gram
from pyfastpeft.subtractive.fit import (FitReport, ModuleFit, SingularFitWarning, UnderdeterminedFitWarning, fit,
                                        rank_modules)
from pyfastpeft.subtractive.gram_accumulate import gram_accumulate
from pyfastpeft.subtractive.modules import FilterBlock
from pyfastpeft.subtractive.reference import gram_accumulate_ref

__all__ = ["fit", "rank_modules", "ModuleFit", "FitReport", "UnderdeterminedFitWarning", "SingularFitWarning",
           "gram_accumulate", "FilterBlock"]

FAMILY = Family(
    name="subtractive",
    title="subtractive fine-tuning (SFP)",
    doc="docs/subtractive.md",
    ops=(Op("gram_accumulate", _gram.gram_accumulate, _gram.explain_args, gram_accumulate_ref, top_level=False),),
    modules=(FilterBlock,),
    checks="pyfastpeft.subtractive.checks:checks",
    costs=("pyfastpeft.subtractive.gram_accumulate:COSTS",),
    kernels=("pyfastpeft.triton_kernels.subtractive.gram_accumulate",),
    benchmarks=("benchmarks/bench_subtractive.py",),
)
