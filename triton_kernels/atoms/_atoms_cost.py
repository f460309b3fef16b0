"""Declared cost of each filter-atom launch: FLOPs and unique HBM bytes (read, write). Triton-free.

"Unique bytes" is every element a launch loads or stores, counted once (tiles re-read by several programs
hit L2). ``tests/atoms/test_atoms_cost.py`` runs the Triton kernels under the interpreter and checks the
formulas of :func:`fold_cost` and :func:`atom_grad_bytes` against the distinct addresses their loads and
stores touch. The convolutions are cuDNN's; their cost is the textbook one (``torch.utils.flop_counter``'s
FLOPs, each operand read once and the output written once).
"""
from __future__ import annotations

from pyfastpeft.core.cost import cdiv as _cdiv


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def fold_cost(A: int, B: int, PQ: int, m: int, itemsize: int, *, per_channel: bool = False, coeff_size: int = 4,
              atoms_size: int = 4) -> dict:
    """``_atom_fold_kernel`` on a weight viewed as ``(A, B, P·Q)``: ``W' = W + Σ_j coeff[a,b,j] · D[(b,) j]``."""
    n = A * B * PQ
    d = (B if per_channel else 1) * m * PQ
    return dict(flops=2 * n * m + n, read=n * itemsize + A * B * m * coeff_size + d * atoms_size,
                write=n * itemsize)


def conv_cost(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, itemsize, *, has_bias=False) -> dict:
    """One convolution (cuDNN): read x and W' (and bias), write y."""
    return dict(flops=2 * N * ho * wo * cout * cin_g * kh * kw,
                read=(N * cin * H * W + cout * cin_g * kh * kw + (cout if has_bias else 0)) * itemsize,
                write=N * cout * ho * wo * itemsize)


def conv_dx_cost(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, itemsize) -> dict:
    """The input gradient of one convolution (cuDNN): read dy and W', write dx."""
    return dict(flops=2 * N * ho * wo * cout * cin_g * kh * kw,
                read=(N * cout * ho * wo + cout * cin_g * kh * kw) * itemsize, write=N * cin * H * W * itemsize)


def touched(size: int, out: int, k: int, stride: int, pad: int, dil: int) -> int:
    """How many input rows (or columns) in ``[0, size)`` some output position reads through some tap."""
    return len({o * stride - pad + t * dil for o in range(out) for t in range(k)} & set(range(size)))


def atom_grad_bytes(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, stride, padding, dilation, itemsize, *,
                    programs: int, coeff_size: int = 4) -> dict:
    """Unique bytes of ``_atom_grad_kernel``: all of dy and coeff, the touched part of x, fp32 partials
    ``(programs, C_in, m, kh·kw)`` written once."""
    rows = touched(H, ho, kh, stride[0], padding[0], dilation[0])
    cols = touched(W, wo, kw, stride[1], padding[1], dilation[1])
    read = (N * cout * ho * wo + N * cin * rows * cols) * itemsize + cout * cin_g * m * coeff_size
    return dict(read=read, write=programs * cin * m * kh * kw * 4)


H100_SMS = 132
PROGRAMS_PER_SM = 4


ACC_BUDGET = 2048  # fp32 elements of the (BLOCK_I, MP, TP) accumulator per program: 16 registers at 4 warps
TILE_BUDGET = {True: 2048, False: 4096}  # fp32 elements of the g tile (BLOCK_P, BLOCK_I·MP): fp32 / 16-bit


def grad_blocks(cin_g: int, cout_g: int, m: int, taps: int, *, fp32: bool = False, interpreting: bool = False) -> dict:
    """Block sizes of ``_atom_grad_kernel``: pixels ``BLOCK_P``, contraction ``BLOCK_O``, input channels
    ``BLOCK_I`` (``BLOCK_I · MP >= 16`` for ``tl.dot``), ``MP`` = m padded to a power of two, ``TP`` = taps
    padded, and whether the depthwise path (``C_in/g = C_out/g = 1``: ``g`` is a product) runs.

    ``TC``: fp16/bf16 inputs run the correlation on tensor cores, a batched ``tl.dot`` over the input
    channels, ``(BLOCK_I, MQ, BLOCK_P) @ (BLOCK_I, BLOCK_P, TP)``, with m zero-padded to ``MQ = 16`` and the
    taps to ``TP >= 16`` (``tl.dot``'s minimum); fp32 keeps the FMA correlation (``MQ = MP``). The
    accumulator and the ``g`` tile are capped (``ACC_BUDGET``, ``TILE_BUDGET``) so that every shipped config
    compiles without spills (compile report)."""
    mp = _pow2(m)
    # tensor cores for 16-bit inputs unless the padded (16 x taps) tile is too big: m > 8 with a 7x7 kernel spills
    tc = not fp32 and max(mp, 16) * max(_pow2(taps), 16) <= 512
    mq = max(mp, 16) if tc else mp
    tp = max(_pow2(taps), 16) if tc else _pow2(taps)
    depthwise = cin_g == 1 and cout_g == 1
    cap = max(ACC_BUDGET // (mq * tp), 1)
    if depthwise:
        bi = min(16, cap)
    elif interpreting:
        bi = max(16 // mp, 1)
    else:
        bi = max(min(max(_pow2(cin_g), 16 // mp, 1), max(64 // mp, 1), cap), 16 // mp, 1)
    if interpreting:
        bp = 64
    elif tc:  # the gathered x tile (BLOCK_I, BLOCK_P, TP) and its 64-bit pointers: 16 pixels for 7x7 kernels
        bp = 32 if tp <= 16 else 16
    else:
        bp = min(32 if fp32 else 64, max(TILE_BUDGET[fp32] // (bi * mp), 16))
    return dict(BLOCK_P=bp, BLOCK_O=16 if interpreting else 32, BLOCK_I=bi, MP=mp, MQ=mq, TP=tp, TC=tc,
                DEPTHWISE=depthwise)


def pixel_programs(P: int, block_p: int, channel_programs: int, sms: int = H100_SMS) -> int:
    """Programs along the pixels: enough for ~4 per SM in all, never more than there are pixel blocks. Each
    program loops over its pixel blocks and writes one fp32 partial ``dD`` per channel block."""
    return max(1, min(_cdiv(P, block_p), _cdiv(PROGRAMS_PER_SM * sms, channel_programs)))


def grad_grid(N, cin, cout, groups, ho, wo, m, taps, *, fp32=False, interpreting=False,
              sms=H100_SMS) -> tuple[dict, int, int]:
    """``(blocks, pixel programs, channel programs)`` of one launch."""
    cin_g, cout_g = cin // groups, cout // groups
    b = grad_blocks(cin_g, cout_g, m, taps, fp32=fp32, interpreting=interpreting)
    ch = _cdiv(cin, b["BLOCK_I"]) if b["DEPTHWISE"] else groups * _cdiv(cin_g, b["BLOCK_I"])
    return b, pixel_programs(N * ho * wo, b["BLOCK_P"], ch, sms), ch


def atom_grad_cost(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, itemsize, groups, *, fp32=False):
    """``(gemm, correlation)`` cost dicts of one ``_atom_grad_kernel`` launch (plus the partials' reduction),
    split for the roofline model: the 1×1 contraction ``g = dy · coeff`` (a GEMM, tensor cores for
    fp16/bf16; all the kernel's bytes) and the depthwise correlation of ``g`` with ``x`` (FMA units, no
    extra kernel bytes: ``g`` lives in registers; the bytes here are the partials' reduction). FLOPs are what
    the kernel issues: m padded to a power of two."""
    P = N * ho * wo
    b, npp, _ = grad_grid(N, cin, cout, groups, ho, wo, m, kh * kw, fp32=fp32)
    mp = b["MP"]
    gemm_flops = (P * cin * mp) if b["DEPTHWISE"] else 2 * P * cout * cin_g * mp
    read = (P * cout + N * cin * H * W) * itemsize + cout * cin_g * m * 4
    partials = npp * cin * m * kh * kw * 4
    gemm = dict(flops=gemm_flops, read=read, write=partials)
    # tensor cores (TC): padded (MQ, TP) tiles; FMA: m padded to MP, exactly kh·kw taps
    corr_flops = 2 * P * cin * b["MQ"] * b["TP"] if b["TC"] else 2 * P * cin * mp * kh * kw
    corr = dict(flops=corr_flops, read=partials, write=cin * m * kh * kw * 4)
    return gemm, corr


def weight_grad_route_cost(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, itemsize) -> tuple[dict, dict]:
    """``(wgrad, contract)`` cost dicts of the other exact route: cuDNN's weight gradient ``dW'`` (reads x and dy,
    writes the fp32 weight-sized ``dW'``), then ``dD = Σ_o coeff · dW'`` (weight-sized, FMA units)."""
    w = cout * cin_g * kh * kw
    wgrad = dict(flops=2 * N * ho * wo * cout * cin_g * kh * kw,
                 read=(N * cout * ho * wo + N * cin * H * W) * itemsize, write=w * 4)
    contract = dict(flops=2 * w * m, read=w * 4 + cout * cin_g * m * 4, write=cin_g * m * kh * kw * 4)
    return wgrad, contract


def _model_s(cost: dict, tensor_core: bool) -> float:
    """Seconds on the modeled H100 (the same figures as ``pyfastpeft.tools.perf.DEVICES['h100']``)."""
    peak = 790e12 if tensor_core else 60e12
    return max(cost["flops"] / peak, (cost["read"] + cost["write"]) / 3.0e12) + 2e-6


def prefer_weight_grad(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, itemsize, groups) -> bool:
    """GPU rule: take the weight-gradient route when the modeled H100 says it is faster than the atom-gradient
    kernel (whose depthwise correlation runs on FMA units: e.g. m = kh·kw, or depthwise convs)."""
    half = itemsize == 2
    wgrad, contract = weight_grad_route_cost(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, itemsize)
    kernel = sum(_model_s(c, tc and half) for _, c, tc in
                 atom_grad_launches(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, itemsize, groups))
    return _model_s(wgrad, half) + _model_s(contract, False) < kernel


def atom_grad_launches(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, itemsize, groups) -> list:
    """``[(name, cost, tensor_core)]`` of one ``_atom_grad_kernel`` launch for the roofline model. With the
    tensor-core correlation (fp16/bf16) the whole kernel is one tensor-core launch (contraction + correlation
    FLOPs against its bytes); with the FMA correlation (fp32, or m > 8 with 7x7) the correlation is declared
    apart at the FMA peak (the model's one-peak-per-launch rule), with the partials' reduction as its bytes."""
    b = grad_blocks(cin_g, cout // groups, m, kh * kw, fp32=itemsize == 4)
    gemm, corr = atom_grad_cost(N, cin, H, W, cout, cin_g, kh, kw, ho, wo, m, itemsize, groups, fp32=itemsize == 4)
    if b["TC"]:
        one = dict(flops=gemm["flops"] + corr["flops"], read=gemm["read"] + corr["read"],
                   write=gemm["write"] + corr["write"])
        return [("triton:atom_grad", one, True)]
    return [("triton:atom_grad(1x1 contraction)", gemm, True), ("triton:atom_grad(correlation, FMA)", corr, False)]


LIN_BLOCK = 64  # tile edge of _atom_linear_grad_kernel (triton_kernels/atoms/atoms.py)


def linear_grad_cost(T: int, N: int, K: int, kc: int, m: int, itemsize: int, coeff_size: int = 4) -> dict:
    """``_atom_linear_grad_kernel``: ``dW'`` tiles (``2·T·N·K`` tensor-core FLOPs) contracted in registers with
    the coefficients (``2·N·K·m``); reads dy, x and coeff once, writes one fp32 ``(m, kc, kc)`` partial per
    ``64 x 64`` tile. The weight-sized ``dW'`` never reaches HBM."""
    progs = _cdiv(N, LIN_BLOCK) * _cdiv(K, LIN_BLOCK)
    return dict(flops=2 * T * N * K + 2 * N * K * m,
                read=(T * N + T * K) * itemsize + (N // kc) * (K // kc) * m * coeff_size,
                write=progs * m * kc * kc * 4)
