"""Real headless Chromium (Playwright, Debian's /usr/bin/chromium) against a running server:
admin creates a campaign and a rater; the rater labels with the keyboard and opens the
guidelines; admin exports; the export trains a reward model.

Locally a missing Chromium or Playwright skips with a reason; under CI=true it must run.
Set PALATE_SCREENSHOTS=DIR to save the rater page and dashboard screenshots (docs/img).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from palate.label.db import open_db
from palate.label.store import create_user

from ..browser import CHROMIUM, need_browser
from .test_server import start_server

WORDS = ["river", "stone", "cloud", "lamp", "chair", "tree", "paper", "glass"]


def pairs_file(path: Path, n: int = 6) -> None:
    rows = []
    for i in range(n):
        good = f"{WORDS[i % 8]} banana {WORDS[(i + 3) % 8]}"
        bad = f"{WORDS[(i + 1) % 8]} {WORDS[(i + 5) % 8]} <script>window.pwned=1</script>"
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Say something nice #{i}"}],
                "response_a": good if i % 2 else bad,
                "response_b": bad if i % 2 else good,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.timeout(300)
def test_admin_and_rater_in_a_real_browser(tmp_path: Path) -> None:
    need_browser()
    from playwright.sync_api import sync_playwright

    db = str(tmp_path / "b.db")
    with open_db(db)() as s:
        create_user(s, "admin", "admin", password="admin-pw")
    pairs_file(tmp_path / "pairs.jsonl")
    shots = os.environ.get("PALATE_SCREENSHOTS")
    proc, url = start_server(db)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            admin = browser.new_context(
                viewport={"width": 1200, "height": 900}, accept_downloads=True
            ).new_page()
            admin.goto(url + "/")
            admin.fill("input[name=name]", "admin")
            admin.fill("input[name=password]", "admin-pw")
            admin.click("button[type=submit]")
            admin.goto(url + "/admin")
            # campaign from a pairs file, with guidelines
            form = admin.locator("#add-campaign")
            form.locator("input[name=name]").fill("bananas")
            form.locator("textarea[name=guidelines]").fill(
                "Prefer the reply that mentions **banana**."
            )
            form.locator("input[name=pairs]").set_input_files(str(tmp_path / "pairs.jsonl"))
            form.locator("button[type=submit]").click()
            assert admin.locator("#campaign-1").is_visible()
            # a rater, with an invite link
            add = admin.locator("#add-rater")
            add.locator("input[name=name]").fill("rita")
            add.locator("button[type=submit]").click()
            invite = admin.locator("#invite-link").inner_text()

            rater = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            rater.goto(invite)  # a page with a button: a GET alone signs nobody in
            with rater.expect_navigation():
                rater.click("#invite-form button")
            rater.click("text=guidelines")
            assert "mentions" in rater.locator(".guidelines").inner_text()
            assert rater.locator(".guidelines strong").inner_text() == "banana"
            rater.goto(url + "/campaigns/1/rate")
            assert rater.locator("#remaining").inner_text() == "6"
            # "How much better?" is asked only when A or B is better
            rater.keyboard.press("3")  # tie
            assert not rater.locator("#strength").is_visible()
            rater.keyboard.press("1")
            assert rater.locator("#strength").is_visible()
            labelled = 0
            while rater.locator("#done").count() == 0:
                left = rater.locator("#response-a .text").inner_text()
                assert "<script>" in left or "banana" in left  # shown as text
                if shots and labelled == 0:
                    rater.screenshot(path=f"{shots}/rater-page.png", full_page=True)
                rater.keyboard.press("1" if "banana" in left else "2")
                if labelled == 0:  # the first label says how much better, and why
                    rater.locator("#strength").get_by_label("clearly").check()
                    rater.fill("textarea[name=comment]", "it mentions banana")
                    rater.locator("#response-a").click()  # focus off the text box
                with rater.expect_navigation():
                    rater.keyboard.press("Enter")
                labelled += 1
            assert labelled == 6
            assert rater.evaluate("window.pwned") is None  # the <script> never ran
            # the rater cannot open the dashboard
            assert rater.goto(url + "/admin").status == 403
            # log out, then the back button: the page is asked for again (no-store) and the
            # server sends the browser to the login page, not to the rater's page
            rater.goto(url + "/campaigns/1/guidelines")
            with rater.expect_navigation():
                rater.click("header button")
            assert rater.url.endswith("/login")
            rater.go_back()
            assert rater.url.endswith("/login") and rater.locator(".guidelines").count() == 0

            # the admin revokes rita's invite: the old link now says so, clearly
            admin.goto(url + "/admin")
            with admin.expect_navigation():
                admin.click("#revoke-invite-2")
            stranger = browser.new_context().new_page()
            assert stranger.goto(invite).status == 403
            assert "revoked" in stranger.locator("#invite-problem").inner_text()

            admin.goto(url + "/admin")
            assert "6 / 6 labels" in admin.locator("#campaign-1").inner_text()
            # rater attributes, set on the dashboard, shown beside her quality numbers
            form = admin.locator("#attributes-2")
            form.locator("input[name=attributes]").fill("region=EU, language=de")
            with admin.expect_navigation():
                form.locator("button").click()
            table = admin.locator("#raters-table-1")
            assert "region=EU, language=de" in table.inner_text()
            assert "reliability" in table.inner_text() and "first shown" in table.inner_text()
            # one pair's labels side by side: her strength and reason are there
            pages = [
                admin.goto(f"{url}/admin/pairs/{pid}") and admin.content() for pid in range(1, 7)
            ]
            (page,) = [p for p in pages if "it mentions banana" in p]
            assert "clearly" in page and "region=EU" in page
            admin.goto(url + "/admin")
            if shots:
                admin.screenshot(path=f"{shots}/dashboard.png", full_page=True)
            with admin.expect_download() as dl:
                admin.click("#export-1")
            export = tmp_path / "export.jsonl"
            dl.value.save_as(export)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)
    rows = [json.loads(x) for x in export.read_text().splitlines()]
    assert len(rows) == 6 and all("banana" in r["chosen"] for r in rows)
    # the export trains a reward model as it is
    from palate.config import load_config
    from palate.reward import RewardConfig, train_reward

    cfg = load_config(
        RewardConfig,
        None,
        [
            "model=tiny",
            f"data={export}",
            "eval_fraction=0",
            f"output_dir={tmp_path / 'rm'}",
            "train.max_steps=2",
            "max_length=48",
            "precision=fp32",
        ],
    )
    summary = train_reward(cfg)
    assert summary["train_pairs"] == 6 and Path(summary["final"]).is_dir()
