"""Tests for ``pyfastpeft.tools.compile_report`` (ahead-of-time Triton compile + ptxas -v, no GPU needed).

The test session runs with ``TRITON_INTERPRET=1``; a kernel decorated under it cannot be compiled, so the
toy kernels live in helper modules written to ``tmp_path`` and are compiled by the report's own
subprocess, which removes ``TRITON_INTERPRET`` before importing them.
"""
from __future__ import annotations

import json
import textwrap
import uuid

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

from pyfastpeft.tools import compile_report as cr  # noqa: E402

TOY_KERNEL = '''
import triton
import triton.language as tl

from pyfastpeft.core.triton_config import AOTSpec


@triton.jit
def toy_axpy(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (alpha * x + y).to(out_ptr.dtype.element_ty), mask=mask)


def _spec(dt, **kw):
    sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "out_ptr": f"*{dt}", "n": "i32", "alpha": "fp32",
           "BLOCK": "constexpr"}
    sig.update(kw)
    return sig
'''

GOOD_SPECS = '''
AOT_SPECS = [
    AOTSpec(name=f"toy_axpy_{dt}", kernel=toy_axpy, signature=_spec(dt), constexprs={"BLOCK": 512},
            num_warps=4, num_stages=1)
    for dt in ("bf16", "fp32")
]
'''

# A tensor-descriptor (TMA on sm_90a) load feeding a tl.dot: the report must see UTMALDG and HGMMA on Hopper
# and neither on Ampere (there Triton lowers the descriptor to pointer loads and the dot to mma.sync).
TMA_SPECS = '''
@triton.jit
def toy_tma_dot(a_desc, b_desc, out_ptr, n, BLOCK: tl.constexpr):
    a = a_desc.load([tl.program_id(0) * BLOCK, 0])
    b = b_desc.load([0, 0])
    c = tl.dot(a, b)
    rm = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rn = tl.arange(0, BLOCK)
    tl.store(out_ptr + rm[:, None] * BLOCK + rn[None, :], c, mask=rm[:, None] < n)


AOT_SPECS = [AOTSpec(name="toy_tma_dot", kernel=toy_tma_dot,
                     signature={"a_desc": "tensordesc<fp16[64,64]>", "b_desc": "tensordesc<fp16[64,64]>",
                                "out_ptr": "*fp32", "n": "i32"},
                     constexprs={"BLOCK": 64}, num_warps=4, num_stages=1)]
'''

BROKEN_SPECS = '''
_bad = _spec("bf16")
del _bad["out_ptr"]
_bad["out"] = "*bf16"   # wrong argument name: the kernel has no "out"
AOT_SPECS = [
    AOTSpec(name="toy_axpy_fp32_ok", kernel=toy_axpy, signature=_spec("fp32"), constexprs={"BLOCK": 256}),
    AOTSpec(name="toy_axpy_wrong_signature", kernel=toy_axpy, signature=_bad, constexprs={"BLOCK": 256}),
]
'''


def _helper_module(tmp_path, monkeypatch, body: str) -> str:
    name = f"pfp_toy_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TOY_KERNEL + body))
    monkeypatch.syspath_prepend(str(tmp_path))  # the report's subprocess inherits our sys.path
    return name


def test_toy_kernel_compiles_for_both_archs(tmp_path, monkeypatch, capfd):
    # Force the path the test session takes anyway: run() must re-execute itself without the interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name = _helper_module(tmp_path, monkeypatch, GOOD_SPECS)
    out = tmp_path / "report.json"
    rows = cr.run(modules=[name], json_path=str(out))
    printed = capfd.readouterr().out

    assert {(r["spec"], r["arch"]) for r in rows} == {
        (f"toy_axpy_{dt}", arch) for dt in ("bf16", "fp32") for arch in ("sm_80", "sm_90a")}
    for r in rows:
        assert r["ok"], r["error"]
        assert isinstance(r["registers"], int) and 0 < r["registers"] <= 255
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert isinstance(r["triton_shared"], int) and r["triton_shared"] >= 0
        assert r["ptxas_smem"] == 0
        assert r["num_warps"] == 4 and r["num_stages"] == 1
        assert r["kernel"] == "toy_axpy"
        # no dot, no descriptor: the judged columns are present and zero; 4 warps of a small kernel are
        # bounded by threads (16 x 128) or registers, never by the (absent) shared memory
        assert r["wgmma"] == 0 and r["tma"] == 0 and r["counts_from"] in ("sass", "ptx")
        assert r["smem"] == r["triton_shared"] + r["ptxas_smem"]
        assert r["ctas_per_sm"] == cr.ctas_per_sm(90 if r["arch"] == "sm_90a" else 80, r["registers"], 4,
                                                  r["smem"])[0]
        assert 1 <= r["ctas_per_sm"] <= 16
    assert cr.exit_code(rows, fail_on_spill=True) == 0

    data = json.loads(out.read_text())
    assert data["results"] == rows
    assert data["versions"]["triton"] == triton.__version__
    assert "toy_axpy_bf16" in printed and "sm_90a" in printed and "triton shared" in printed


def test_tma_and_wgmma_are_counted(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name = _helper_module(tmp_path, monkeypatch, TMA_SPECS)
    out = tmp_path / "report.json"
    rows = {r["arch"]: r for r in cr.run(modules=[name], json_path=str(out))}
    printed = capfd.readouterr().out
    hop, amp = rows["sm_90a"], rows["sm_80"]
    assert hop["ok"] and amp["ok"], (hop["error"], amp["error"])
    assert hop["tma"] >= 2 and hop["wgmma"] >= 1  # two descriptor loads, one 64x64x64 dot (several HGMMA)
    assert hop["ptx_tma"] >= 2 and hop["ptx_wgmma"] >= 1
    assert amp["tma"] == 0 and amp["wgmma"] == 0 and amp["hmma"] > 0
    for r in json.loads(out.read_text())["results"]:
        assert {"wgmma", "tma", "ctas_per_sm", "smem"} <= set(r)
    assert ("UTMALDG" in printed) == (hop["counts_from"] == "sass")


def test_broken_spec_fails_and_is_named(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    name = _helper_module(tmp_path, monkeypatch, BROKEN_SPECS)
    code = cr.main(["--modules", name, "--arch", "sm_80"])
    cap = capfd.readouterr()
    text = cap.out + cap.err
    assert code != 0
    assert "toy_axpy_wrong_signature" in text
    assert "'out'" in text  # the message says which argument is wrong
    fails = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert fails and all("toy_axpy_wrong_signature" in line for line in fails)


def test_interpreted_kernel_gives_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton.language as tl

    @triton.jit
    def interp_only(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    cr._import_package()
    from pyfastpeft.core.triton_config import AOTSpec

    spec = AOTSpec(name="interp", kernel=interp_only, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                   constexprs={"BLOCK": 64})
    row = cr.compile_spec(spec, "sm_80")
    assert not row["ok"] and "TRITON_INTERPRET" in row["error"]


def test_signature_completion(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton.language as tl

    @triton.jit
    def k(a_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr = True):
        pass

    class S:  # duck-typed spec
        signature = {"n": "i32", "a_ptr": "*bf16"}
        constexprs = {"BLOCK": 32}

    sig, const = cr._complete_signature(S, k)
    assert list(sig) == ["a_ptr", "n", "BLOCK", "EVEN"]
    assert sig["BLOCK"] == sig["EVEN"] == "constexpr"
    assert const == {"BLOCK": 32, "EVEN": True}

    # a runtime argument given a value is specialised, as the JIT does for integer 1
    S.constexprs = {"BLOCK": 32, "n": 1}
    sig, const = cr._complete_signature(S, k)
    assert sig["n"] == "constexpr" and const["n"] == 1

    S.signature = {"a_ptr": "*bf16"}
    S.constexprs = {"BLOCK": 32}
    with pytest.raises(cr.CompileReportError, match="'n'"):
        cr._complete_signature(S, k)


def test_parse_ptxas_log():
    log = textwrap.dedent("""\
        ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function 'mm' for 'sm_90a'
        ptxas info    : Function properties for mm
            1832 bytes stack frame, 2048 bytes spill stores, 1604 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 1832 bytes cumulative stack size
        """)
    s = cr.parse_ptxas_log(log)
    assert (s["registers"], s["spill_stores"], s["spill_loads"]) == (255, 2048, 1604)
    assert (s["stack_frame"], s["ptxas_smem"], s["barriers"]) == (1832, 1024, 1)
    assert len(s["ptxas_notes"]) == 1 and "wgmma" in s["ptxas_notes"][0]
    row = dict(ok=True, spill_stores=2048, spill_loads=1604)
    assert cr.exit_code([row]) == 0 and cr.exit_code([row], fail_on_spill=True) == 1
    assert cr.exit_code([dict(ok=False)]) == 1


CANNED_SASS = """
        /*0240*/                   @UP2 UTMALDG.2D [UR8], [UR6] ;                         /* 0x00000008060025b4 */
        /*0250*/                   UTMALDG.2D [UR16], [UR6] ;                             /* 0x00000010060075b4 */
        /*0400*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ; /* 0x0 */
        /*0410*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;  /* 0x0 */
        /*0420*/              @!P0 HGMMA.64x32x16.F32.BF16 R88, gdesc[UR12], R88 ;        /* 0x0 */
        /*0500*/               @P1 LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR6][R2.64] ;   /* 0x0 */
        /*0600*/                   UTMASTG.2D [UR4], [UR6] ;                              /* 0x0 */
        /*0700*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                  /* 0x0 */
        /*0800*/                   MOV R1, c[0x0][0x28] ;  // HGMMA in a comment is not an instruction
"""

CANNED_PTX = """
\t@%p3 cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r2], [%rd1, {%r3, %r4}], [%r1];
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r5], [%rd1, {%r3, %r4}], [%r1];
\tcp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd2, {%r6, %r7}], [%r8];
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd4, %rd5, %p1, 1, 1, 0, 1;
\t@!%p2 wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd6, %rd7, %p1, 1, 1, 0, 1;
\twgmma.fence.sync.aligned;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1}, {%r2}, {%f1};
"""


def test_count_sass_and_ptx():
    assert cr.count_sass(CANNED_SASS) == dict(hgmma=3, hmma=1, utmaldg=2, utmastg=1, ldgsts=1)
    assert cr.count_ptx(CANNED_PTX) == dict(wgmma=2, mma=1, tma=2, tma_store=1)


def test_ctas_per_sm():
    # the fused forward as measured before the Hopper variant: 237 registers x 8 warps -> one CTA per SM
    assert cr.ctas_per_sm(90, 237, 8, 104448) == (1, "regs")
    # 128 registers x 8 warps fill exactly half the register file: 2 CTAs, if shared memory allows
    assert cr.ctas_per_sm(90, 128, 8, 90000) == (2, "regs")
    assert cr.ctas_per_sm(90, 128, 8, 120000) == (1, "smem")  # 2 x (120000 + 1024) > 228 KiB
    # registers are allocated per warp in units of 256: 129 registers round up to 136 -> 65536 // (136*32*8) = 1
    assert cr.ctas_per_sm(90, 129, 8, 0) == (1, "regs")
    # sm_80 has 164 KiB per SM: 2 x (80000 + 1024) fits, 3 do not
    assert cr.ctas_per_sm(80, 64, 4, 80000) == (2, "smem")
    # small blocks: bounded by resident threads (2048 / 128) or the 32-block limit
    assert cr.ctas_per_sm(90, 16, 4, 0) == (16, "threads")
    assert cr.ctas_per_sm(90, 16, 1, 0) == (32, "ctas")
    assert cr.ctas_per_sm(90, None, 4, 0) == (None, "")


def test_arch_parsing():
    assert cr._parse_arch("sm_80") == (80, "sm_80")
    assert cr._parse_arch("sm_90") == (90, "sm_90a")
    assert cr._parse_arch("90a") == (90, "sm_90a")
    with pytest.raises(cr.CompileReportError):
        cr._parse_arch("hopper")
