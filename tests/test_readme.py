"""Every Python block of README.md runs as written (in an empty working directory), and every line it prints
equals the ``# comment`` of the ``print`` that printed it."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _expected(block: str) -> list:
    """The comments of the ``print(...)`` lines, in order (every print of a README block prints one line)."""
    out = []
    for line in block.splitlines():
        m = re.match(r"\s*print\(.*\)\s*#\s?(.*)$", line)
        if m:
            out.append(m.group(1).strip())
        elif re.match(r"\s*print\(", line):
            out.append(None)  # a print without a stated result: any output
    return out


def test_readme_has_a_quick_start_block():
    assert BLOCKS, "README.md has no ```python block"
    assert "pfp.inject" in BLOCKS[0] and "PeftModel.from_pretrained" in BLOCKS[0]


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs_and_prints_its_comments(i, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {"__name__": "__readme__"})
    printed = [line.strip() for line in buf.getvalue().splitlines()]
    want = _expected(BLOCKS[i])
    assert len(printed) == len(want), f"printed {printed}, the comments say {want}"
    for got, exp in zip(printed, want):
        if exp is not None:
            assert got == exp
