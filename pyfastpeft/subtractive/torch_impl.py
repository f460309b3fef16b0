"""``torch`` backend of the Gram accumulation: the contract every backend of ``gram_accumulate`` implements.

On 2-D ``x (M, K)`` and ``y (M, N)`` (any strides), with ``X̃ = [X, 1]`` when ``bias`` (else ``X̃ = X``):

    G = X̃ᵀ X̃   (K+1, K+1), both triangles filled (symmetric up to BLAS rounding on this path)
    C = X̃ᵀ Y   (K+1, N)

Outputs are fp32 for fp32/fp16/bf16 inputs and fp64 for fp64 inputs. Accuracy contract (blocked
summation): rows are reduced in blocks of at most :data:`ROW_BLOCK`, each block in fp32 (16-bit inputs
are upcast, so every product is exact), and the blocks are added in fp64, so the error does not grow
with ``M`` beyond one block's ``u·sqrt(ROW_BLOCK)``. ``X̃`` is never materialised: the bias row and
column are the column sums of X and Y and the row count.

The row loop reads each row of X and Y once. On a CPU this path computes the full ``XᵀX`` (BLAS has
no public SYRK in torch); the Triton kernel computes the upper triangle only and mirrors it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pyfastpeft.core.dtypes import acc_dtype

ROW_BLOCK = 8192  # rows per fp32 block; fp64 between blocks




def _block(xb: Tensor, yb: Tensor, G: Tensor, C: Tensor, bias: bool) -> None:
    """G, C of one row block, written in place (BLAS writes straight into the slices: no temporaries)."""
    K = xb.shape[1]
    torch.mm(xb.t(), xb, out=G[:K, :K])
    torch.mm(xb.t(), yb, out=C[:K])
    if bias:
        torch.sum(xb, 0, out=G[K, :K])
        G[:K, K] = G[K, :K]
        torch.sum(yb, 0, out=C[K])
        G[K, K] = xb.shape[0]


def fwd(x: Tensor, y: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    M, K = x.shape
    N = y.shape[1]
    kb = K + 1 if bias else K
    out_dt = acc_dtype(x.dtype)
    G = torch.empty(kb, kb, dtype=out_dt, device=x.device)
    C = torch.empty(kb, N, dtype=out_dt, device=x.device)
    if M == 0:
        return G.zero_(), C.zero_()
    if M <= ROW_BLOCK:  # one block (the fit's usual batch): no wide accumulator needed
        _block(x.to(out_dt), y.to(out_dt), G, C, bias)
        return G, C
    wide = torch.float64  # between blocks
    Gw = torch.zeros(kb, kb, dtype=wide, device=x.device)
    Cw = torch.zeros(kb, N, dtype=wide, device=x.device)
    for m0 in range(0, M, ROW_BLOCK):
        _block(x[m0:m0 + ROW_BLOCK].to(out_dt), y[m0:m0 + ROW_BLOCK].to(out_dt), G, C, bias)
        Gw += G
        Cw += C
    return G.copy_(Gw), C.copy_(Cw)
