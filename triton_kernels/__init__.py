"""Triton kernels and their launchers, installed as ``pyfastpeft.triton_kernels``.

Importing this package touches no GPU and does not import Triton; each kernel module imports Triton
itself and is imported lazily by ``pyfastpeft.ops`` only when the ``triton`` backend is selected.
"""
