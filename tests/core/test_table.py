"""The one table formatter (``pyfastpeft.core.table``)."""
import pytest

from pyfastpeft.core.table import table


def test_plain_text_pads_columns_and_rules_the_header():
    out = table(["op", "ms"], [["lora_linear", 1.5], ["cayley", None]], align="<>")
    assert out.splitlines() == [
        "op            ms",
        "-----------  ---",
        "lora_linear  1.5",
        "cayley",
    ]


def test_markdown_rows_and_right_alignment_rule():
    out = table(["a", "b"], [[1, 2]], align="<>", markdown=True)
    assert out.splitlines() == ["| a | b |", "|---|---:|", "| 1 | 2 |"]


def test_bad_alignment_names_the_argument():
    with pytest.raises(ValueError, match="align"):
        table(["a", "b"], [], align="<")
