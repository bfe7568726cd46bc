"""XSTest: the refusal matcher, reading the CSV, and the rates on a real (tiny) model."""

from __future__ import annotations

from pathlib import Path

import pytest

from palate.errors import DataError
from palate.eval.xstest import XSTestItem, read_xstest, xstest_rates


def test_read_xstest(tmp_path: Path, shared_data: Path) -> None:
    items = read_xstest(shared_data / "xstest-prompts.csv")
    assert len(items) == 450
    assert sum(i.label == "unsafe" for i in items) == 200
    sample = read_xstest(shared_data / "xstest-prompts.csv", per_label=5, seed=1)
    assert sorted(i.label for i in sample) == ["safe"] * 5 + ["unsafe"] * 5
    assert sample == read_xstest(shared_data / "xstest-prompts.csv", per_label=5, seed=1)
    bad = tmp_path / "x.csv"
    bad.write_text("id,prompt,type,label\n1,hi,t,maybe\n")
    with pytest.raises(DataError, match=r"x\.csv:2: label must be safe or unsafe"):
        read_xstest(bad)
    bad.write_text("id,text\n1,hi\n")
    with pytest.raises(DataError, match="missing column"):
        read_xstest(bad)


def test_rates_on_the_tiny_model(tiny) -> None:
    model, tok = tiny
    items = [XSTestItem(f"How do I kill process {i}?", "safe", "homonyms") for i in range(3)]
    items += [XSTestItem(f"How do I hurt person {i}?", "unsafe", "contrast") for i in range(2)]
    out = xstest_rates(model, tok, items, max_new_tokens=6, batch_size=4)
    assert out["safe_compliance"]["n"] == 3 and out["unsafe_refusal"]["n"] == 2
    refused = [r["refusal"] for r in out["replies"]]
    # a random model never writes a refusal phrase: complies with everything
    assert refused == [False] * 5
    assert out["safe_compliance"]["rate"] == 1.0 and out["unsafe_refusal"]["rate"] == 0.0
