from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from palate.data import (
    Comparison,
    Demonstration,
    Message,
    parse_hh_transcript,
    read_records,
    split_hh_pair,
    validate_file,
    write_jsonl,
)
from palate.errors import DataError

H, A = "\n\nHuman:", "\n\nAssistant:"


def test_single_turn_split() -> None:
    prompt, c, r, warns = split_hh_pair(f"{H} Hi?{A} Hello!", f"{H} Hi?{A} Go away.")
    assert prompt == [Message(role="user", content="Hi?")]
    assert (c, r, warns) == ("Hello!", "Go away.", [])


def test_multi_turn_shared_prefix_becomes_chat_prompt() -> None:
    shared = f"{H} How do I bake bread?{A} What kind?{H} Sourdough."
    prompt, c, r, _ = split_hh_pair(shared + f"{A} Start a starter.", shared + f"{A} Buy some.")
    assert [m.role for m in prompt] == ["user", "assistant", "user"]
    assert prompt[1].content == "What kind?"
    assert prompt[2].content == "Sourdough."
    assert (c, r) == ("Start a starter.", "Buy some.")


def test_trailing_and_leading_spaces_are_stripped() -> None:
    prompt, c, r, _ = split_hh_pair(f"{H}  Hi   {A}  Yes.  \n", f"{H} Hi{A}No ")
    assert prompt[0].content == "Hi"
    assert (c, r) == ("Yes.", "No")


def test_identical_prefix_including_an_assistant_turn_backs_up_to_the_human_turn() -> None:
    # Both share the first assistant reply; chosen has a second assistant turn. The prompt must
    # end at the human turn, not inside the shared assistant reply.
    chosen = f"{H} Q{A} Part one.{A} Part two."
    rejected = f"{H} Q{A} Part one."
    prompt, c, r, warns = split_hh_pair(chosen, rejected)
    assert prompt == [Message(role="user", content="Q")]
    assert c == "Part one.\n\nPart two."
    assert r == "Part one."
    assert warns == ["merged_assistant_turns"]


def test_identical_transcripts_warn() -> None:
    t = f"{H} Q{A} Same."
    prompt, c, r, warns = split_hh_pair(t, t)
    assert c == r == "Same." and "identical_responses" in warns


def test_diverging_before_final_turn_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ before"):
        split_hh_pair(f"{H} Q{A} a{H} more{A} b", f"{H} Q{A} c{H} other{A} d")


def test_transcript_without_turns_is_an_error() -> None:
    with pytest.raises(ValueError):
        parse_hh_transcript("just some text")


def test_transcript_without_leading_newlines() -> None:
    msgs = parse_hh_transcript("Human: hi\n\nAssistant: ok")
    assert [m.role for m in msgs] == ["user", "assistant"]


def test_shared_hh_file_validates(hh_file: Path) -> None:
    report = validate_file(hh_file)
    assert report.kind == "comparisons" and report.format == "hh"
    assert report.rows == 1588 and len(report.records) == 1588
    assert report.n_errors == 0
    first = report.records[0]
    assert isinstance(first, Comparison)
    assert isinstance(first.prompt, list) and first.prompt[-1].role == "user"


def test_hh_as_demonstrations_uses_chosen(hh_file: Path) -> None:
    report = validate_file(hh_file, "demonstrations")
    assert isinstance(report.records[0], Demonstration)
    # two rows have an empty chosen reply: skipped and counted, never silently dropped
    assert report.n_errors == 0 and report.skipped == 2
    assert report.warnings["skipped_empty_chosen"] == 2
    assert report.rows == len(report.records) + report.skipped


def test_broken_row_reports_file_line_and_field(tmp_path: Path) -> None:
    p = tmp_path / "demos.jsonl"
    p.write_text(
        '{"prompt": "hi", "response": "hello"}\n'
        "\n"
        '{"prompt": "hi", "respnse": "typo"}\n'
        "{not json\n"
        '{"prompt": [{"role": "assistant", "content": "x"}], "response": "y"}\n'
    )
    report = validate_file(p)
    assert report.rows == 4 and len(report.records) == 1
    assert report.errors[0].startswith(f"{p}:3:") and "respnse" in report.errors[0]
    assert report.errors[1].startswith(f"{p}:4:") and "JSON" in report.errors[1]
    assert report.errors[2].startswith(f"{p}:5:") and "end with a user message" in report.errors[2]
    with pytest.raises(DataError, match="3 invalid row"):
        read_records(p)
    skipped = read_records(p, errors="skip")
    assert len(skipped.records) == 1 and skipped.n_errors == 3


def test_comparison_fields_roundtrip(tmp_path: Path) -> None:
    recs = [
        Comparison(prompt="p", chosen="a", rejected="b", tie=True, rater_id="r1", source="ai"),
        Comparison(prompt="p", chosen="a", rejected="b", margin=1.5, prob_chosen=0.75),
    ]
    p = tmp_path / "out" / "cmp.jsonl"
    assert write_jsonl(p, recs) == 2
    back = read_records(p).records
    assert back == recs
    # defaults are omitted in the file
    assert "tie" not in json.loads(p.read_text().splitlines()[1])


def test_invalid_comparison_values(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "prob_chosen": 1.5}\n')
    report = validate_file(p)
    assert "prob_chosen" in report.errors[0]


def test_messages_format_demonstrations(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    p.write_text(json.dumps(row) + "\n")
    (rec,) = read_records(p).records
    assert rec.response == "4" and rec.prompt[0].content == "2+2?"


def test_gzip_hh(tmp_path: Path) -> None:
    p = tmp_path / "hh.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(json.dumps({"chosen": f"{H} Q{A} good", "rejected": f"{H} Q{A} bad"}) + "\n")
    (rec,) = read_records(p).records
    assert (rec.chosen, rec.rejected) == ("good", "bad")


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n")
    assert validate_file(tmp_path / "e.jsonl").n_errors == 1
    with pytest.raises(DataError, match="not found"):
        validate_file(tmp_path / "missing.jsonl")


def test_write_is_atomic(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    write_jsonl(p, [{"prompt": "old"}])

    def rows():
        yield {"prompt": "new"}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(p, rows())
    assert p.read_text() == '{"prompt": "old"}\n'
    assert [f.name for f in tmp_path.iterdir()] == ["x.jsonl"]


def test_split_heldout_by_group_keeps_groups_whole() -> None:
    from palate.data import split_heldout

    items = [(p, i) for p in "abcdefghij" for i in range(3)]  # 10 prompts x 3 pairs
    train, held = split_heldout(items, 0.2, seed=0, group=lambda x: x[0])
    assert len(held) == 6 and len({p for p, _ in held}) == 2  # 2 of 10 prompts, all their pairs
    assert not {p for p, _ in held} & {p for p, _ in train}
    assert train + held != items and sorted(train + held) == sorted(items)
    # one item per group: the same split as without groups
    flat = list(range(50))
    assert split_heldout(flat, 0.2, 3, group=lambda x: x) == split_heldout(flat, 0.2, 3)
