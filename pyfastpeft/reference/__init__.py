"""Naive, differentiable, fp64-capable references: the test oracles. Never a backend.

Every family's references (``pyfastpeft/<family>/reference.py``), named ``<op>_ref``. A reference imports
nothing from the kernels, the torch backends or their helpers, so a bug there cannot hide in the oracle.
"""
from pyfastpeft.families import references as _references

globals().update(_references())
__all__ = list(_references())
