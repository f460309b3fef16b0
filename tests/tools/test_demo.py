"""``pyfastpeft demo --quick``: every available method trains on both tiny models, PEFT beside it where PEFT has
the method, and the table, JSON, CSV and PNG are written (in-process, torch backend, about 20 s on CPU)."""
from __future__ import annotations

import csv
import json

import pytest

from pyfastpeft.tools.cli import main
from pyfastpeft.surgery import available_methods

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def test_demo_quick_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--backend", "torch", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for col in ("loss first", "loss last", "step ms", "x peft", "trainable", "saved MiB"):
        assert col in text
    data = json.loads((out / "demo.json").read_text())
    rows = data["rows"]
    assert data["metadata"]["command"].startswith("pyfastpeft demo --quick")
    ours = {(r["model"], r["method"]) for r in rows if r["impl"] == "pyfastpeft"}
    assert ours == {(m, meth) for m in ("vit", "llama") for meth in available_methods()}
    theirs = {(r["model"], r["method"]) for r in rows if r["impl"] == "peft"}
    assert theirs == {(m, meth) for m in ("vit", "llama") for meth in ("lora", "oft", "psoft")
                      if meth in available_methods()}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["trainable_params"] > 0 and r["saved_bytes"] > 0 and r["step_ms"] > 0
        assert len(data["curves"][f"{r['model']}/{r['method']}/{r['impl']}"]) == 6
    by = {(r["model"], r["method"], r["impl"]): r for r in rows}
    for m in ("vit", "llama"):  # same start, same data, same maths: PEFT's loss curve is ours
        a, b = by[(m, "lora", "pyfastpeft")], by[(m, "lora", "peft")]
        assert a["trainable_params"] == b["trainable_params"]
        assert a["loss_last"] == pytest.approx(b["loss_last"], rel=1e-4)
    if "gated_lora" in available_methods():  # its selected fraction per step, in the JSON and the table's note
        for m in ("vit", "llama"):
            frac = data["selected"][f"{m}/gated_lora/pyfastpeft"]
            assert len(frac) == 6 and frac[0] == 1.0 and all(0.0 <= f <= 1.0 for f in frac), frac
            note = by[(m, "gated_lora", "pyfastpeft")]["note"]
            assert note.startswith(f"tokens selected 100% -> {100 * frac[-1]:.0f}%") and "LoRA's last loss" in note
    with open(out / "demo.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "demo.png").stat().st_size > 10_000


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--models", "resnet"]) == 2
    assert main(["demo", "--methods", "dora"]) == 2
    assert main(["demo", "--steps", "1"]) == 2
    assert "unknown model" in capsys.readouterr().err
