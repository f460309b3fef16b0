"""Filter-atom kernels (Triton): the ``triton`` backend of ``atom_conv2d`` / ``atom_linear`` (``docs/atoms.md``).

* ``_atom_fold_kernel``: ``W' = W + ΔW`` in one pass over a weight viewed as ``(A, B, P, Q)`` with any strides,
  ``ΔW[a,b,p,q] = Σ_j coeff[a,b,j] · D[(b,) j,p,q]``. A conv weight ``(C_out, C_in/g, kh, kw)`` is that view
  directly (``D`` shared ``(m, kh, kw)``, or per input channel ``(C_in/g, m, kh, kw)``); a linear weight
  ``(N, K)`` with ``kc × kc`` channel blocks is the strided view ``(N/kc, K/kc, kc, kc)``. Weight-sized work,
  fp32 accumulation, one rounding; the forward is then ONE convolution (cuDNN) with ``W'``.
* ``_atom_grad_kernel``: the atom gradient without the full weight gradient. A program owns a block of input
  channels ``i`` (within one group) and loops over pixel blocks ``(n, ho, wo)``; per pixel block it forms
  ``g[p, i, j] = Σ_{o in group} dy[p, o] · coeff[o, i, j]`` with ``tl.dot`` over ``BLOCK_O`` chunks of the
  group's outputs (registers only, never stored), then for each of the ``kh·kw`` taps loads the matching
  ``x`` tile (``x[n, i, ho·s - pad + p·d, wo·s - pad + q·d]``, zero outside) and accumulates
  ``Σ_p g[p, i, j] · x_tap[p, i]`` into a ``(BLOCK_I, MP, TP)`` fp32 accumulator. Depthwise convs
  (``C_in/g = C_out/g = 1``, ``DEPTHWISE``) skip the contraction: ``g = dy[p, i] · coeff[i, 0, j]`` and a
  channel block spans groups. Each program writes one fp32 partial ``(C_in-block, m, kh·kw)``; the launcher
  sums the partials (a few programs per SM, so the partials are small) and then over groups / channels.
  Costs ``~m/(kh·kw)`` of a weight gradient in the contraction; ``dy`` and ``x`` are each read about once.

* ``_atom_linear_grad_kernel`` (channel-block linear atoms): one ``64 x 64`` tile of ``dW' = dyᵀ x`` per program
  in registers, contracted at once with the coefficients of the ``kc x kc`` blocks it covers into an fp32
  partial ``(m, kc, kc)``; ``dW'`` never reaches HBM (it still costs one GEMM of FLOPs). ``kc``: a power of two
  <= 64.

Layouts: any strides, so NCHW and channels_last inputs run without copies. Dtypes fp32/fp16/bf16 for x/dy/W;
coeff and atoms any float dtype (loaded and converted). Limits of the grad kernel: ``m <= 16``, ``kh·kw <= 64``.
Interpreter: bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1``, so dot operands are upcast to fp32
there (``UPCAST``), and bf16 outputs are written to fp32 buffers and rounded by torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfastpeft.core.alloc import empty_out
from pyfastpeft.triton_kernels.atoms import _atoms_cost as _cost
from pyfastpeft.core.triton_config import AOTSpec, interpreting

MAX_ATOMS = 16  # MP (m padded) x TP (taps padded) x BLOCK_I fp32 accumulators must stay in registers
MAX_TAPS = 64  # 7x7 depthwise (49 taps) pads to 64
FOLD_BLOCK_R, FOLD_BLOCK_T = 32, 64


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _upcast(dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _store_dtype(dtype):
    """fp32->bf16 stores truncate under the interpreter: write fp32 there and let torch round."""
    return torch.float32 if (interpreting() and dtype == torch.bfloat16) else dtype


@triton.jit
def _atom_fold_kernel(
    w_ptr, c_ptr, d_ptr, out_ptr,
    A, B, Q, PQ, M,
    stride_wa, stride_wb, stride_wp, stride_wq,
    stride_ca, stride_cb, stride_cj,
    stride_db, stride_dj, stride_dp, stride_dq,
    stride_oa, stride_ob, stride_op, stride_oq,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # int64: rows x strides can pass 2**31
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = r < A * B
    t_ok = t < PQ
    a = r // B
    b = r % B
    p = t // Q
    q = t % Q
    mask = r_ok[:, None] & t_ok[None, :]
    w = tl.load(w_ptr + a[:, None] * stride_wa + b[:, None] * stride_wb + p[None, :] * stride_wp
                + q[None, :] * stride_wq, mask=mask, other=0.0).to(tl.float32)
    c_row = c_ptr + a * stride_ca + b * stride_cb
    d_tile = d_ptr + b[:, None] * stride_db + p[None, :] * stride_dp + q[None, :] * stride_dq  # stride_db = 0: shared
    for j in range(0, M):  # m is small (<= a few tens): rank-1 updates, no tensor-core shape limits
        cj = tl.load(c_row + j * stride_cj, mask=r_ok, other=0.0).to(tl.float32)
        dj = tl.load(d_tile + j * stride_dj, mask=mask, other=0.0).to(tl.float32)
        w += cj[:, None] * dj
    tl.store(out_ptr + a[:, None] * stride_oa + b[:, None] * stride_ob + p[None, :] * stride_op
             + q[None, :] * stride_oq, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _atom_grad_kernel(
    dy_ptr, x_ptr, c_ptr, part_ptr,
    NPIX, HOWO, WO, H, W, CIN_G, COUT_G, M, KW, KK, NUM_PIX_BLOCKS, PIX_PROGS, N_IB,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    s_dyn, s_dyc, s_dyh, s_dyw,
    s_xn, s_xc, s_xh, s_xw,
    s_co, s_ci, s_cj,
    s_pp, s_pc, s_pj, s_pt,
    DEPTHWISE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, MP: tl.constexpr, MQ: tl.constexpr,
    TP: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    jj = tl.arange(0, MP)
    tt = tl.arange(0, TP)
    if DEPTHWISE:  # one input channel per group and C_out = C_in: the block spans groups, o = i
        grp = 0
        i_loc = pid_c * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i_loc < CIN_G  # CIN_G is C_in here
        i_glob = i_loc.to(tl.int64)
        alpha = tl.load(c_ptr + i_glob[:, None] * s_co + jj[None, :] * s_cj,
                        mask=i_ok[:, None] & (jj[None, :] < M), other=0.0).to(tl.float32)  # (BLOCK_I, MP)
    else:
        grp = pid_c // N_IB
        i_loc = (pid_c % N_IB) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_ok = i_loc < CIN_G
        i_glob = (grp * CIN_G + i_loc).to(tl.int64)
        col = tl.arange(0, BLOCK_I * MP)  # g's columns: (i, j) flattened, j fastest
        col_i = (pid_c % N_IB) * BLOCK_I + col // MP
        col_j = col % MP
        col_ok = (col_i < CIN_G) & (col_j < M)
    acc = tl.zeros((BLOCK_I, MQ, TP), dtype=tl.float32)  # row j·(MQ/MP) holds atom j (MQ = MP without TC)
    for pb in range(pid_p, NUM_PIX_BLOCKS, PIX_PROGS):
        pix = (pb * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        pix_ok = pix < NPIX
        n = pix // HOWO
        rem = pix % HOWO
        ho = rem // WO
        wo = rem % WO
        dy_row = dy_ptr + n * s_dyn + ho * s_dyh + wo * s_dyw
        if DEPTHWISE:
            dyv = tl.load(dy_row[:, None] + i_glob[None, :] * s_dyc, mask=pix_ok[:, None] & i_ok[None, :],
                          other=0.0).to(tl.float32)
            g3 = dyv[:, :, None] * alpha[None, :, :]  # (BLOCK_P, BLOCK_I, MP)
        else:
            g = tl.zeros((BLOCK_P, BLOCK_I * MP), dtype=tl.float32)
            for o0 in range(0, COUT_G, BLOCK_O):
                o = o0 + tl.arange(0, BLOCK_O)
                o_ok = o < COUT_G
                o_glob = (grp * COUT_G + o).to(tl.int64)
                dyt = tl.load(dy_row[:, None] + o_glob[None, :] * s_dyc, mask=pix_ok[:, None] & o_ok[None, :],
                              other=0.0)
                ct = tl.load(c_ptr + o_glob[:, None] * s_co + col_i[None, :] * s_ci + col_j[None, :] * s_cj,
                             mask=o_ok[:, None] & col_ok[None, :], other=0.0)
                if UPCAST:
                    g += tl.dot(dyt.to(tl.float32), ct.to(tl.float32), input_precision="ieee")
                else:
                    g += tl.dot(dyt, ct.to(dyt.dtype), input_precision=PRECISION)
            g3 = tl.reshape(g, (BLOCK_P, BLOCK_I, MP))
        x_row = x_ptr + n * s_xn
        if TC:
            acc += _corr_tc(g3, x_row, ho, wo, pix_ok, i_glob, i_ok, KK, KW, H, W, stride_h, stride_w, pad_h, pad_w,
                            dil_h, dil_w, s_xc, s_xh, s_xw, UPCAST, BLOCK_P, BLOCK_I, MP, MQ, TP)
        else:
            acc += _corr_fma(g3, x_row, ho, wo, pix_ok, i_glob, i_ok, KK, KW, H, W, stride_h, stride_w, pad_h,
                             pad_w, dil_h, dil_w, s_xc, s_xh, s_xw, BLOCK_I, MP, TP)
    jq = tl.arange(0, MQ)
    j_ok = ((jq % (MQ // MP)) == 0) & ((jq // (MQ // MP)) < M)
    out = (part_ptr + pid_p * s_pp + i_glob[:, None, None] * s_pc + (jq // (MQ // MP))[None, :, None] * s_pj
           + tt[None, None, :] * s_pt)
    tl.store(out, acc, mask=i_ok[:, None, None] & j_ok[None, :, None] & (tt[None, None, :] < KK))


@triton.jit
def _corr_fma(g3, x_row, ho, wo, pix_ok, i_glob, i_ok, KK, KW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
              s_xc, s_xh, s_xw, BLOCK_I: tl.constexpr, MP: tl.constexpr, TP: tl.constexpr):
    """FMA-unit correlation (fp32): per tap, ``Σ_p g3[p, i, j] · x_tap[p, i]`` into column t of the result."""
    tt = tl.arange(0, TP)
    acc = tl.zeros((BLOCK_I, MP, TP), dtype=tl.float32)
    for t in range(0, KK):
        hi = ho * stride_h - pad_h + (t // KW) * dil_h
        wi = wo * stride_w - pad_w + (t % KW) * dil_w
        ok = pix_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        xv = tl.load((x_row + hi * s_xh + wi * s_xw)[:, None] + i_glob[None, :] * s_xc,
                     mask=ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_P, BLOCK_I)
        contrib = tl.sum(g3 * xv[:, :, None], axis=0)  # (BLOCK_I, MP)
        acc += tl.where(tt[None, None, :] == t, contrib[:, :, None], 0.0)
    return acc


@triton.jit
def _corr_tc(g3, x_row, ho, wo, pix_ok, i_glob, i_ok, KK, KW, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
             s_xc, s_xh, s_xw, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, MP: tl.constexpr,
             MQ: tl.constexpr, TP: tl.constexpr):
    """Tensor-core correlation (fp16/bf16): one batched dot over the input channels,
    ``(BLOCK_I, MQ, BLOCK_P) @ (BLOCK_I, BLOCK_P, TP)``. m is zero-padded to MQ = 16 by interleaving zeros
    (``tl.join``: atom j lands in row j·MQ/MP); the taps are gathered as a (BLOCK_I, BLOCK_P, TP) tile."""
    gp = g3
    if MQ // MP >= 2:
        gp = tl.reshape(tl.join(gp, tl.zeros_like(gp)), (BLOCK_P, BLOCK_I, 2 * MP))
    if MQ // MP >= 4:
        gp = tl.reshape(tl.join(gp, tl.zeros_like(gp)), (BLOCK_P, BLOCK_I, 4 * MP))
    if MQ // MP >= 8:
        gp = tl.reshape(tl.join(gp, tl.zeros_like(gp)), (BLOCK_P, BLOCK_I, 8 * MP))
    if MQ // MP >= 16:
        gp = tl.reshape(tl.join(gp, tl.zeros_like(gp)), (BLOCK_P, BLOCK_I, 16 * MP))
    a = tl.permute(gp, (1, 2, 0))  # (BLOCK_I, MQ, BLOCK_P)
    tap = tl.arange(0, TP)
    hi = ho[:, None] * stride_h - pad_h + (tap // KW)[None, :] * dil_h  # (BLOCK_P, TP)
    wi = wo[:, None] * stride_w - pad_w + (tap % KW)[None, :] * dil_w
    ok = pix_ok[:, None] & (tap < KK)[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    ptr = (x_row[:, None] + hi * s_xh + wi * s_xw)[None, :, :] + i_glob[:, None, None] * s_xc
    xv = tl.load(ptr, mask=ok[None, :, :] & i_ok[:, None, None], other=0.0)  # (BLOCK_I, BLOCK_P, TP)
    if UPCAST:
        return tl.dot(a, xv.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(xv.dtype), xv)


# ----------------------------------------------------------------------------------------------- launchers
def _fold_launch(w4, strides_w, coeff, atoms_strides, atoms, out, strides_o, A, B, P, Q, m):
    grid = (triton.cdiv(A * B, FOLD_BLOCK_R), triton.cdiv(P * Q, FOLD_BLOCK_T))
    _atom_fold_kernel[grid](
        w4, coeff, atoms, out, A, B, Q, P * Q, m, *strides_w, *coeff.stride(), *atoms_strides, *strides_o,
        BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T, num_warps=4)


def fold(weight: torch.Tensor, coeff: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Conv ``W + ΔW`` (shape and dtype of ``weight``): one ``_atom_fold_kernel`` launch."""
    co, ci, kh, kw = weight.shape
    m = coeff.shape[-1]
    out = empty_out(weight.shape, like=weight, dtype=_store_dtype(weight.dtype))
    if out.numel():
        ad = (0, *atoms.stride()) if atoms.dim() == 3 else tuple(atoms.stride())
        _fold_launch(weight, weight.stride(), coeff, ad, atoms, out, out.stride(), co, ci, kh, kw, m)
    return out.to(weight.dtype)


def fold_linear(weight: torch.Tensor, coeff: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """Linear ``W + ΔW`` with ``kc × kc`` blocks: the fold kernel on the strided view ``(N/kc, K/kc, kc, kc)``."""
    N, K = weight.shape
    nb, kb, m = coeff.shape
    kc = atoms.shape[-1]
    out = empty_out(weight.shape, like=weight, dtype=_store_dtype(weight.dtype))
    if out.numel():
        sw, so = weight.stride(), out.stride()
        _fold_launch(weight, (kc * sw[0], kc * sw[1], sw[0], sw[1]), coeff, (0, *atoms.stride()), atoms, out,
                     (kc * so[0], kc * so[1], so[0], so[1]), nb, kb, kc, kc, m)
    return out.to(weight.dtype)


def atom_grad_supports(x, weight, coeff, atoms, groups):
    if coeff.shape[-1] > MAX_ATOMS:
        return f"num_atoms {coeff.shape[-1]} > {MAX_ATOMS} (the Triton atom-gradient kernel's register limit)"
    if weight.shape[-1] * weight.shape[-2] > MAX_TAPS:
        return f"kernel {tuple(weight.shape[-2:])} has more than {MAX_TAPS} taps (Triton atom-gradient limit)"
    return None


def _sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _cost.H100_SMS


def atom_grad_partials(dy, x, coeff, kernel, stride, padding, dilation, groups):
    """The kernel's fp32 partials ``(pixel programs, C_in, m, kh·kw)`` (exposed for the byte-count test)."""
    N, cin, H, W = x.shape
    cout, cin_g, m = coeff.shape
    kh, kw = kernel
    ho, wo = dy.shape[-2:]
    b, npp, ch = _cost.grad_grid(N, cin, cout, groups, ho, wo, m, kh * kw, fp32=x.dtype == torch.float32,
                                 interpreting=interpreting(), sms=_sms(x.device))
    part = empty_out((npp, cin, m, kh * kw), like=x, dtype=torch.float32)
    npix = N * ho * wo
    n_ib = triton.cdiv(cin_g, b["BLOCK_I"])
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    _atom_grad_kernel[(npp, ch)](
        dy, x, coeff, part,
        npix, ho * wo, wo, H, W, cin if b["DEPTHWISE"] else cin_g, cout // groups, m, kw, kh * kw,
        triton.cdiv(npix, b["BLOCK_P"]), npp, n_ib,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *dy.stride(), *x.stride(), *coeff.stride(), *part.stride(),
        DEPTHWISE=b["DEPTHWISE"], UPCAST=_upcast(x.dtype), PRECISION=prec, TC=b["TC"], BLOCK_P=b["BLOCK_P"],
        BLOCK_O=b["BLOCK_O"], BLOCK_I=b["BLOCK_I"], MP=b["MP"], MQ=b["MQ"], TP=b["TP"], num_warps=4)
    return part


def atom_grad(dy, x, coeff, atoms, stride, padding, dilation, groups):
    """``dD`` (fp32, the atoms' shape) of ``atom_conv2d``: one ``_atom_grad_kernel`` launch, then the sum of the
    per-program partials over programs, groups and (for shared atoms) input channels."""
    kh, kw = atoms.shape[-2:]
    cout, cin_g, m = coeff.shape
    part = atom_grad_partials(dy, x, coeff, (kh, kw), stride, padding, dilation, groups)
    dd = part.sum(0).reshape(groups, cin_g, m, kh, kw).sum(0)
    return dd.sum(0) if atoms.dim() == 3 else dd


# ----------------------------------------------------------------------------------------------- AOT specs
def _fold_spec(ty):
    ints = ["A", "B", "Q", "PQ", "M"] + [f"stride_{t}{s}" for t, ss in (("w", "abpq"), ("c", "abj"), ("d", "bjpq"),
                                                                         ("o", "abpq")) for s in ss]
    sig = {"w_ptr": f"*{ty}", "c_ptr": "*fp32", "d_ptr": "*fp32", "out_ptr": f"*{ty}"}
    sig.update({n: "i32" for n in ints})
    sig.update(BLOCK_R="constexpr", BLOCK_T="constexpr")
    return AOTSpec(f"atom_fold/{ty}/{FOLD_BLOCK_R}x{FOLD_BLOCK_T}", _atom_fold_kernel, sig,
                   dict(BLOCK_R=FOLD_BLOCK_R, BLOCK_T=FOLD_BLOCK_T), num_warps=4, num_stages=1)


def _grad_spec(ty, cin_g, cout_g, m, taps):
    b = _cost.grad_blocks(cin_g, cout_g, m, taps, fp32=ty == "fp32")
    ints = ["NPIX", "HOWO", "WO", "H", "W", "CIN_G", "COUT_G", "M", "KW", "KK", "NUM_PIX_BLOCKS", "PIX_PROGS", "N_IB",
            "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w", "s_dyn", "s_dyc", "s_dyh", "s_dyw",
            "s_xn", "s_xc", "s_xh", "s_xw", "s_co", "s_ci", "s_cj", "s_pp", "s_pc", "s_pj", "s_pt"]
    sig = {"dy_ptr": f"*{ty}", "x_ptr": f"*{ty}", "c_ptr": "*fp32", "part_ptr": "*fp32"}
    sig.update({n: "i32" for n in ints})
    cx = dict(DEPTHWISE=b["DEPTHWISE"], UPCAST=False, PRECISION="ieee" if ty == "fp32" else "tf32", TC=b["TC"],
              BLOCK_P=b["BLOCK_P"], BLOCK_O=b["BLOCK_O"], BLOCK_I=b["BLOCK_I"], MP=b["MP"], MQ=b["MQ"], TP=b["TP"])
    sig.update({k: "constexpr" for k in cx})
    kind = "dw" if b["DEPTHWISE"] else f"cin{cin_g}"
    return AOTSpec(f"atom_grad/{ty}/{kind}/m{m}/taps{taps}/P{b['BLOCK_P']}xI{b['BLOCK_I']}xMQ{b['MQ']}"
                   + ("/tc" if b["TC"] else "/fma"), _atom_grad_kernel, sig,
                   cx, num_warps=4, num_stages=1)


def _aot_specs() -> list:
    """The fold kernel per dtype; the atom-gradient kernel for the shipped shapes of every config family:
    dense 3x3 (ResNet; BLOCK_I from C_in/g and m), depthwise 7x7 (ConvNeXt), m in {4, 9, 16}."""
    specs = []
    for ty in ("bf16", "fp16", "fp32"):
        specs.append(_fold_spec(ty))
        for cin_g, cout_g, m, taps in ((64, 64, 4, 9), (64, 64, 9, 9), (8, 8, 4, 9), (64, 64, 16, 9), (3, 64, 4, 49),
                                       (64, 64, 16, 49), (1, 1, 4, 49), (1, 1, 9, 49), (1, 1, 16, 9), (1, 1, 1, 9)):
            specs.append(_grad_spec(ty, cin_g, cout_g, m, taps))
    return specs


AOT_SPECS = _aot_specs()


# ----------------------------------------------------------------------------------------------- linear atoms
@triton.jit
def _atom_linear_grad_kernel(
    dy_ptr, x_ptr, c_ptr, part_ptr,
    T, N, K, NB, KB, M,
    s_dyt, s_dyn, s_xt, s_xk, s_ca, s_cb, s_cj, s_pp, s_pj, s_pr, s_pc,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, KC: tl.constexpr, MP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (BLOCK_N, BLOCK_K) tile of ``dW' = dyᵀ x`` in registers (never stored), contracted at once with the
    coefficients of the ``(BLOCK_N/KC) x (BLOCK_K/KC)`` channel blocks it covers into a partial
    ``dD (m, KC, KC)`` per program."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_ok = rt < T
        dyt = tl.load(dy_ptr + rt[:, None] * s_dyt + rn[None, :] * s_dyn, mask=t_ok[:, None] & (rn < N)[None, :],
                      other=0.0)
        xt = tl.load(x_ptr + rt[:, None] * s_xt + rk[None, :] * s_xk, mask=t_ok[:, None] & (rk < K)[None, :],
                     other=0.0)
        if UPCAST:
            acc += tl.dot(tl.trans(dyt.to(tl.float32)), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(dyt), xt, input_precision=PRECISION)
    # (BLOCK_N, BLOCK_K) -> (NBT, KBT, KC, KC): block (a, b), row p, column q
    tile = tl.permute(tl.reshape(acc, (BLOCK_N // KC, KC, BLOCK_K // KC, KC)), (0, 2, 1, 3))
    ra = pid_n * (BLOCK_N // KC) + tl.arange(0, BLOCK_N // KC)
    rb = pid_k * (BLOCK_K // KC) + tl.arange(0, BLOCK_K // KC)
    c_ok = (ra < NB)[:, None] & (rb < KB)[None, :]
    rp = tl.arange(0, KC)
    pid = pid_n * tl.num_programs(1) + pid_k
    for j in range(0, M):  # a runtime loop: unrolling m contractions of the tile spills in fp32 (compile report)
        cj = tl.load(c_ptr + ra[:, None] * s_ca + rb[None, :] * s_cb + j * s_cj, mask=c_ok,
                     other=0.0).to(tl.float32)  # (NBT, KBT)
        # blocks past N/K are masked out rather than multiplied by their zero coefficient: the tile's padded rows
        # (dy loaded as 0) times an Inf in x are NaN there, which 0 * NaN would carry into every atom's gradient
        dj = tl.sum(tl.sum(tl.where(c_ok[:, :, None, None], cj[:, :, None, None] * tile, 0.0), axis=0),
                    axis=0)  # (KC, KC)
        tl.store(part_ptr + pid * s_pp + j * s_pj + rp[:, None] * s_pr + rp[None, :] * s_pc, dj)


LIN_BLOCK = 64  # tile edge of the linear atom-gradient kernel (KC must divide it: KC a power of two <= 64)
LIN_BLOCK_T = {True: 16, False: 32}  # token chunk: fp32 (IEEE FMA dots) / 16-bit


def linear_grad_supports(kc: int) -> bool:
    return kc <= LIN_BLOCK and (kc & (kc - 1)) == 0


def atom_linear_grad_partials(dy, x, coeff, kc):
    T, N = dy.shape
    K = x.shape[1]
    nb, kb, m = coeff.shape
    grid = (triton.cdiv(N, LIN_BLOCK), triton.cdiv(K, LIN_BLOCK))
    part = empty_out((grid[0] * grid[1], m, kc, kc), like=x, dtype=torch.float32)
    _atom_linear_grad_kernel[grid](
        dy, x, coeff, part, T, N, K, nb, kb, m, *dy.stride(), *x.stride(), *coeff.stride(), *part.stride(),
        UPCAST=_upcast(x.dtype), PRECISION="ieee" if x.dtype == torch.float32 else "tf32", KC=kc, MP=_pow2(m),
        BLOCK_N=LIN_BLOCK, BLOCK_K=LIN_BLOCK, BLOCK_T=LIN_BLOCK_T[x.dtype == torch.float32], num_warps=4)
    return part


def atom_linear_grad(dy, x, coeff, kc):
    """``dD (m, kc, kc)`` fp32 of ``atom_linear`` without storing ``dW'``: one launch, then the partials' sum."""
    return atom_linear_grad_partials(dy, x, coeff, kc).sum(0)


def _lin_grad_spec(ty, kc, m):
    ints = ["T", "N", "K", "NB", "KB", "M", "s_dyt", "s_dyn", "s_xt", "s_xk", "s_ca", "s_cb", "s_cj", "s_pp", "s_pj",
            "s_pr", "s_pc"]
    sig = {"dy_ptr": f"*{ty}", "x_ptr": f"*{ty}", "c_ptr": "*fp32", "part_ptr": "*fp32"}
    sig.update({n: "i32" for n in ints})
    cx = dict(UPCAST=False, PRECISION="ieee" if ty == "fp32" else "tf32", KC=kc, MP=_pow2(m), BLOCK_N=LIN_BLOCK,
              BLOCK_K=LIN_BLOCK, BLOCK_T=LIN_BLOCK_T[ty == "fp32"])
    sig.update({k: "constexpr" for k in cx})
    return AOTSpec(f"atom_linear_grad/{ty}/kc{kc}/m{m}", _atom_linear_grad_kernel, sig, cx, num_warps=4, num_stages=1)


AOT_SPECS += [_lin_grad_spec(ty, kc, m) for ty in ("bf16", "fp16", "fp32") for kc, m in ((8, 4), (16, 4), (16, 9),
                                                                                         (32, 4), (64, 4), (4, 16))]
