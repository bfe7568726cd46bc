"""Data formats: typed records and JSONL IO, including Anthropic HH-RLHF transcripts.

Three record types flow through the RLHF loop (all JSONL, one object per line):

* :class:`PromptRecord` — ``{"prompt": ...}``: what the policy is asked.
* :class:`Demonstration` — ``{"prompt": ..., "response": "..."}`` (or ``{"messages": [...]}``
  ending with an assistant message): what SFT trains on.
* :class:`Comparison` — ``{"prompt": ..., "chosen": "...", "rejected": "..."}`` plus optional
  ``tie``, ``margin``, ``prob_chosen`` (soft label), ``rater_id`` and ``source``: what the
  reward model trains on.

A prompt is either a string (one user turn) or a list of chat messages
``{"role": "system"|"user"|"assistant", "content": "..."}`` ending with a user turn.

Anthropic HH-RLHF files (``{"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}`` with
``\\n\\nHuman:`` / ``\\n\\nAssistant:`` turns, ``.jsonl`` or ``.jsonl.gz``) are read as
comparisons: the shared turns become the chat prompt and the final assistant turns the two
responses (see :func:`split_hh_pair`).

Bad rows raise :class:`~palate.errors.DataError` naming file, line and field; with
``errors="skip"`` they are skipped and *counted* in the returned :class:`ReadReport`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from palate.errors import DataError

__all__ = [
    "Comparison",
    "Demonstration",
    "Message",
    "PromptRecord",
    "ReadReport",
    "RecordKind",
    "as_messages",
    "parse_hh_transcript",
    "prompt_contents",
    "prompt_json",
    "prompt_text",
    "read_records",
    "split_heldout",
    "split_hh_pair",
    "validate_file",
    "PairRecord",
    "Sample",
    "read_samples",
    "format_validation_error",
    "read_jsonl",
    "write_jsonl",
]

RecordKind = Literal["prompts", "demonstrations", "comparisons"]
T = TypeVar("T")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Record):
    """One chat turn."""

    role: Literal["system", "user", "assistant"]
    content: str


Prompt = str | list[Message]
Conversation = list[dict[str, str]]  # chat messages as plain dicts: [{"role": "user", ...}]


def _check_prompt(v: Prompt) -> Prompt:
    if isinstance(v, str):
        if not v.strip():
            raise ValueError("prompt is empty")
        return v
    if not v:
        raise ValueError("chat prompt has no messages")
    if v[-1].role != "user":
        raise ValueError(f"chat prompt must end with a user message, not {v[-1].role!r}")
    return v


class PromptRecord(_Record):
    """A prompt for the policy to answer."""

    prompt: Prompt = Field(description="A string (one user turn) or a list of chat messages.")
    id: str | None = Field(None, description="Optional stable identifier.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form extra data.")

    _v = field_validator("prompt")(_check_prompt)


class Demonstration(_Record):
    """A prompt and the ideal response to it (SFT data)."""

    prompt: Prompt
    response: str
    id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    _v = field_validator("prompt")(_check_prompt)

    @field_validator("response")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("response is empty")
        return v


class Comparison(_Record):
    """Two responses to one prompt and which one a rater preferred."""

    prompt: Prompt
    chosen: str = Field(description="The preferred response (either one when tie is true).")
    rejected: str = Field(description="The other response.")
    tie: bool = Field(False, description="Rater judged both equally good (or equally bad).")
    margin: float = Field(
        0.0, ge=0.0, description="Preference strength used as a Bradley-Terry margin (0 = none)."
    )
    prob_chosen: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Soft label: fraction of raters preferring `chosen` (None = hard label).",
    )
    rater_id: str | None = Field(None, description="Who labelled it (person, judge, panel).")
    source: Literal["human", "ai", "simulated"] = Field("human", description="Kind of rater.")
    id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    _v = field_validator("prompt")(_check_prompt)


class PairRecord(_Record):
    """Two responses to one prompt, to be compared by raters (a labeling campaign's row).

    A response may be empty: a policy that ends its reply at once has still replied, and the
    raters (and through them the reward model) should see that it loses. Refusing such pairs
    stopped a later round whose policy sampled one empty reply in 512."""

    prompt: Prompt
    response_a: str
    response_b: str
    source_a: str = Field("", max_length=200, description="Which model wrote response_a.")
    source_b: str = Field("", max_length=200, description="Which model wrote response_b.")
    gold: Literal["a", "b", "tie", "both_bad"] | None = Field(
        None, description="Known answer (a honeypot pair for rater quality)."
    )
    id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    _v = field_validator("prompt")(_check_prompt)


class Sample(_Record):
    """A prompt and one reply a policy sampled for it (a pairs stage's ``samples.jsonl``). Unlike
    a demonstration, the reply may be empty: that is what the policy said."""

    prompt: Prompt
    response: str
    id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    _v = field_validator("prompt")(_check_prompt)


def read_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """Every row of a samples file; a bad row raises one DataError naming file, line and field."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    out = []
    for lineno, line in iter_rows(p):
        try:
            out.append(Sample.model_validate_json(line))
        except ValidationError as err:
            raise DataError(f"{p}:{lineno}: {_format_error(err)}") from err
    if not out:
        raise DataError(f"{p}: no rows (empty file)")
    return out


def format_validation_error(err: ValidationError) -> str:
    """A pydantic error as ``field X: what is wrong; ...`` (one line)."""
    return _format_error(err)


_MODEL_FOR_KIND: dict[str, type[PromptRecord | Demonstration | Comparison]] = {
    "prompts": PromptRecord,
    "demonstrations": Demonstration,
    "comparisons": Comparison,
}


def as_messages(prompt: Prompt | list[dict[str, Any]]) -> list[dict[str, str]]:
    """A prompt as a list of ``{"role", "content"}`` dicts (what chat templates take).

    Also accepts that JSON form itself (as stored by the labeling database)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [
        {"role": m["role"], "content": m["content"]}
        if isinstance(m, dict)
        else {"role": m.role, "content": m.content}
        for m in prompt
    ]


def prompt_contents(prompt: Prompt | list[dict[str, Any]]) -> str:
    """The prompt's message contents alone, blank-line separated (what a rubric or a pattern
    reads; a string, chat messages, or their stored JSON form)."""
    return "\n\n".join(m["content"] for m in as_messages(prompt))


def prompt_text(prompt: Prompt | list[dict[str, Any]]) -> str:
    """A short plain-text rendering of a prompt (for logs, reports and non-chat models)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in as_messages(prompt))


# --------------------------------------------------------------------------- HH-RLHF transcripts

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE: dict[str, Literal["user", "assistant"]] = {"Human": "user", "Assistant": "assistant"}


DEFAULT_CRITERION = "helpfulness"  # what a prompt tests when its metadata names nothing


def criterion_of(metadata: Mapping[str, Any] | None) -> str:
    """The criterion a record's metadata names (``metadata.criterion``), else the default."""
    return (metadata or {}).get("criterion", DEFAULT_CRITERION)


def criteria_by_prompt(records: Iterable[PromptRecord]) -> dict[str, str]:
    """{prompt text (:func:`prompt_text`): criterion} of prompt records."""
    return {prompt_text(r.prompt): criterion_of(r.metadata) for r in records}


def prompt_json(prompt: Prompt) -> str | list[dict[str, Any]]:
    """A prompt as stored in JSONL and the labeling DB: the string, or its messages as dicts."""
    return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]


def parse_hh_transcript(text: str) -> list[Message]:
    """Split ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into chat messages (content stripped)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    if len(parts) < 3:
        raise ValueError("no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    return [
        Message(role=_ROLE[parts[i]], content=parts[i + 1].strip()) for i in range(1, len(parts), 2)
    ]


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str, list[str]]:
    """Split two HH transcripts into (prompt messages, chosen reply, rejected reply, warnings).

    The prompt is the longest run of shared turns that ends with a human turn; each response is
    what follows it. Usually that is one assistant turn. When a transcript has several assistant
    turns in a row after the shared prompt (a few HH rows do), they are joined with a blank line
    and a ``merged_assistant_turns`` warning is returned. Transcripts whose human turns differ
    cannot be one prompt with two responses and raise ``ValueError``.
    """
    tc, tr = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    k = 0
    while k < min(len(tc), len(tr)) and tc[k] == tr[k]:
        k += 1
    while k > 0 and tc[k - 1].role != "user":
        k -= 1
    if k == 0:
        raise ValueError("chosen and rejected share no human turn to use as the prompt")
    rest_c, rest_r = tc[k:], tr[k:]
    warnings: list[str] = []
    for name, rest in (("chosen", rest_c), ("rejected", rest_r)):
        if not rest:
            raise ValueError(f"{name} has no assistant reply after the shared prompt")
        if any(m.role == "user" for m in rest):
            raise ValueError(
                f"{name}: the transcripts differ before the final assistant reply (a human turn "
                "follows the point where they diverge)"
            )
        if len(rest) > 1:
            warnings.append("merged_assistant_turns")
    reply_c = "\n\n".join(m.content for m in rest_c)
    reply_r = "\n\n".join(m.content for m in rest_r)
    if reply_c == reply_r:
        warnings.append("identical_responses")
    return list(tc[:k]), reply_c, reply_r, warnings


# --------------------------------------------------------------------------- reading


@dataclass
class ReadReport:
    """What reading a file found: rows read, records kept, errors and warnings (counted)."""

    path: str
    kind: str | None = None
    format: str = "jsonl"  # or "hh"
    rows: int = 0
    skipped: int = 0  # valid rows that do not apply to the requested kind (see warnings)
    records: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "format": self.format,
            "rows": self.rows,
            "valid": len(self.records),
            "skipped": self.skipped,
            "errors": self.n_errors,
            "warnings": dict(self.warnings),
        }


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _detect(row: dict[str, Any]) -> tuple[str, str]:
    """(kind, format) of a row, from its keys."""
    if "chosen" in row and "rejected" in row:
        return "comparisons", ("jsonl" if "prompt" in row else "hh")
    if "response" in row or "messages" in row:
        return "demonstrations", "jsonl"
    return "prompts", "jsonl"


def _row_to_record(row: Any, natural: str, fmt: str, kind: str) -> tuple[_Record | None, list[str]]:
    """Validate ``row`` as the file's natural record type, then project it to ``kind``."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    warnings: list[str] = []
    if fmt == "hh":
        extra = set(row) - {"chosen", "rejected"}
        if extra:
            raise ValueError(f"unknown field(s) {sorted(extra)} in an HH-style row")
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"field {key}: expected a transcript string")
        prompt, c, r, warnings = split_hh_pair(row["chosen"], row["rejected"])
        row = {"prompt": prompt, "chosen": c, "rejected": r}
    elif natural == "demonstrations" and "messages" in row:
        row = dict(row)
        msgs = row.pop("messages")
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
            raise ValueError("field messages: expected a non-empty list of chat messages")
        if msgs[-1].get("role") != "assistant":
            raise ValueError("field messages: the last message must be the assistant's response")
        row["prompt"], row["response"] = msgs[:-1], msgs[-1].get("content")
    rec = _MODEL_FOR_KIND[natural].model_validate(row)
    if isinstance(rec, Comparison) and (not rec.chosen.strip() or not rec.rejected.strip()):
        warnings.append("empty_response")
    if kind == natural:
        return rec, warnings
    # Projections: any record can serve as a prompt; a comparison's chosen reply can serve as a
    # demonstration (e.g. SFT on the preferred HH responses).
    if kind == "prompts":
        return PromptRecord(prompt=rec.prompt, id=rec.id, metadata=rec.metadata), warnings
    if kind == "demonstrations" and isinstance(rec, Comparison):
        if not rec.chosen.strip():  # a valid comparison, but no demonstration: skip, counted
            return None, [*warnings, "skipped_empty_chosen"]
        return Demonstration(
            prompt=rec.prompt, response=rec.chosen, id=rec.id, metadata=rec.metadata
        ), warnings
    raise ValueError(f"this file holds {natural}, but {kind} are needed here")


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(row)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        msg = msg.removeprefix("Value error, ")
        parts.append(f"field {loc}: {msg}")
    return "; ".join(parts)


def iter_rows(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every non-blank line."""
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield lineno, line


def validate_file(path: str | os.PathLike[str], kind: RecordKind | None = None) -> ReadReport:
    """Read and validate every row; never raises for bad rows (they go to ``report.errors``)."""
    p = Path(path)
    report = ReadReport(path=str(p), kind=kind)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    natural: str | None = None
    fmt = "jsonl"
    try:
        for lineno, line in iter_rows(p):
            report.rows += 1
            where = f"{p}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                report.errors.append(f"{where}: not valid JSON ({err.msg} at column {err.colno})")
                continue
            if natural is None and isinstance(row, dict):
                natural, fmt = _detect(row)
                report.format = fmt
                if report.kind is None:
                    report.kind = natural
            try:
                rec, warns = _row_to_record(
                    row, natural or "prompts", fmt, report.kind or "prompts"
                )
            except ValidationError as err:
                report.errors.append(f"{where}: {_format_error(err)}")
                continue
            except ValueError as err:
                report.errors.append(f"{where}: {err}")
                continue
            report.warnings.update(warns)
            if rec is None:
                report.skipped += 1
            else:
                report.records.append(rec)
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataError(f"{p}: cannot read file: {err}") from err
    if report.rows == 0:
        report.errors.append(f"{p}: no rows (empty file)")
    return report


def read_records(
    path: str | os.PathLike[str],
    kind: RecordKind | None = None,
    *,
    errors: Literal["raise", "skip"] = "raise",
) -> ReadReport:
    """Read a JSONL (or HH) file into typed records.

    ``kind`` pins the expected record type (auto-detected from the first row otherwise). With
    ``errors="raise"`` (default) any bad row raises :class:`DataError` listing up to 10 of them
    with file and line; with ``"skip"`` bad rows are skipped and counted in the report.
    """
    report = validate_file(path, kind)
    if report.errors and (errors == "raise" or not report.records):
        shown = "\n".join(report.errors[:10])
        more = f"\n... and {report.n_errors - 10} more" if report.n_errors > 10 else ""
        raise DataError(f"{report.n_errors} invalid row(s) in {path}:\n{shown}{more}")
    return report


def split_heldout(
    items: list[T], fraction: float, seed: int, group: Callable[[T], Any] | None = None
) -> tuple[list[T], list[T]]:
    """(train, held-out): a seeded random ``fraction`` held out, both in file order.

    With ``group`` (e.g. the prompt), whole groups are held out, so no held-out item shares a
    group with a training one; when every group has one item the split is the same as without.
    """
    import torch

    keys = [group(x) for x in items] if group is not None else list(range(len(items)))
    first: dict[Any, int] = {}
    for k in keys:
        first.setdefault(k, len(first))
    n = len(first)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[: int(round(fraction * n))])
    is_held = [first[k] in held for k in keys]
    return (
        [x for x, h in zip(items, is_held, strict=True) if not h],
        [x for x, h in zip(items, is_held, strict=True) if h],
    )


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place only on success."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL file palate wrote (metrics, samples, evaluation points); none when
    the file does not exist. Data files from users go through :func:`read_records`."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def write_jsonl(path: str | os.PathLike[str], records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write records as JSONL atomically (defaults omitted for readability). Returns the count."""
    n = 0
    with atomic_write(path) as fh:
        for rec in records:
            obj = (
                rec.model_dump(mode="json", exclude_defaults=True)
                if isinstance(rec, BaseModel)
                else rec
            )
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n
