"""The reports' Jinja2 environment: templates under ``templates/``, autoescaped (prompts, replies,
rater and policy names are untrusted text), and the atomic write of a rendered page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from palate.data import atomic_write

__all__ = ["fmt", "write_page"]

TEMPLATES = Path(__file__).parent / "templates"


def fmt(v: Any) -> str:
    """A number or text as the reports show it: floats to 3 decimals, ``None`` as empty."""
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["fmt"] = fmt


def write_page(path: str | Path, template: str, **context: Any) -> Path:
    """Render ``template`` with ``context`` to ``path`` (atomically) and return the path."""
    page = ENV.get_template(template).render(**context)
    path = Path(path)
    with atomic_write(path) as fh:
        fh.write(page)
    return path
