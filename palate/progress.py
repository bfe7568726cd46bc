"""Progress bars on stderr (stdout stays clean for ``--json``), via rich.

Set ``PALATE_PROGRESS=0`` to turn them off (tests do).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["console", "progress_bar"]

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress | None, task: Any):
        self._p, self._t = progress, task

    def advance(self, n: float = 1, **fields: Any) -> None:
        if self._p is not None:
            self._p.update(self._t, advance=n, info=_fmt(fields))

    def update(self, completed: float | None = None, **fields: Any) -> None:
        if self._p is not None:
            kw: dict[str, Any] = {"info": _fmt(fields)} if fields else {}
            if completed is not None:
                kw["completed"] = completed
            self._p.update(self._t, **kw)


def _fmt(fields: dict[str, Any]) -> str:
    return "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
    )


def enabled() -> bool:
    """Bars on unless PALATE_PROGRESS=0, and only on the first of several processes."""
    if int(os.environ.get("RANK", "0") or 0) > 0:
        return False
    return os.environ.get("PALATE_PROGRESS", "1") not in ("0", "false", "no")


@contextmanager
def progress_bar(description: str, total: float | None, completed: int = 0) -> Iterator[_Bar]:
    """``with progress_bar("sft", total=steps) as bar: bar.advance(loss=0.3)``."""
    if not enabled():
        yield _Bar(None, None)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as p:
        task = p.add_task(description, total=total, completed=completed, info="")
        yield _Bar(p, task)
