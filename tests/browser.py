"""Real headless Chromium for the tests (Playwright, Debian's /usr/bin/chromium).

Locally a missing Chromium or Playwright skips with a reason; under CI it must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

__all__ = ["CHROMIUM", "need_browser", "render_report"]


def need_browser() -> None:
    """Skip (or, under CI, fail) when Chromium or Playwright is missing."""
    reason = None
    if CHROMIUM is None:
        reason = "chromium not installed (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright  # noqa: F401
        except ImportError:
            reason = "playwright (python) not installed"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the browser test")
        pytest.skip(reason)


def render_report(
    path: Path, plot_ids: Iterable[str], screenshot: Path | None = None
) -> dict[str, Any]:
    """Open the HTML report at ``path`` in headless Chromium and check that every plot in
    ``plot_ids`` is shown: ``figure#<id> img`` exists, is visible, and its PNG decoded
    (``complete`` with ``naturalWidth > 0``). Fails on any page or console error.

    Returns ``title``, ``headings`` (the h2 texts), ``figures`` (how many), ``text`` (the body
    as rendered text), ``plots`` ({id: [naturalWidth, naturalHeight]}) and ``errors``.
    """
    need_browser()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    plots: dict[str, list[int]] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on(
                "console",
                lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            for plot_id in plot_ids:
                img = page.locator(f"figure#{plot_id} img")
                assert img.count() == 1, f"plot {plot_id!r}: no <img> in figure#{plot_id}"
                assert img.is_visible(), f"plot {plot_id!r} is not visible"
                complete, width, height = img.evaluate(
                    "el => [el.complete, el.naturalWidth, el.naturalHeight]"
                )
                assert complete and width > 0 and height > 0, (
                    f"plot {plot_id!r} did not decode: complete={complete}, size {width}×{height}"
                )
                plots[plot_id] = [width, height]
            facts = {
                "title": page.title(),
                "headings": [h.strip() for h in page.locator("h2").all_inner_texts()],
                "figures": page.locator("figure").count(),
                "text": page.locator("body").inner_text(),
                "plots": plots,
                "errors": errors,
            }
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert not errors, f"errors in the page: {errors}"
    return facts
