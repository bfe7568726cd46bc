"""Regression tests for the labeling app's hardening (issue #15), each reproducing a finding:
bad pairs, invite links, sessions, secrets in cookies, stale slots, export names, input limits,
throttling, headers, and the admin's campaign and user controls. SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from palate.errors import DataError
from palate.label.app import create_app
from palate.label.db import Assignment, Campaign, Pair, User
from palate.label.store import PairIn, create_campaign, create_user

from .test_app import csrf_of, login


@pytest.fixture
def env(db_url: str):
    app = create_app(db_url, secret_key="test")
    with app.state.sessionmaker() as db:
        create_user(db, "admin", "admin", password="pw-admin")
        _, rita_invite, rita_api = create_user(db, "rita", "rater")
        _, _, otto_api = create_user(db, "otto", "rater", password="pw-otto")
        camp = create_campaign(
            db,
            "camp",
            [PairIn(prompt=f"q{i}", response_a=f"A{i}", response_b=f"B{i}") for i in range(3)],
            overlap=1,
        )
    return app, {"camp": camp.id, "invite": rita_invite, "rita": rita_api, "otto": otto_api}


def admin_client(app) -> TestClient:
    a = TestClient(app)
    login(a, "admin", "pw-admin")
    return a


def admin_post(a: TestClient, path: str, **data):
    page = a.get("/admin").text
    return a.post(path, data={"csrf": csrf_of(page), **data}, follow_redirects=False)


def sign_in_by_invite(app, token: str) -> TestClient:
    c = TestClient(app)
    page = c.get(f"/invite/{token}")
    assert page.status_code == 200, page.text
    r = c.post(f"/invite/{token}", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    return c


def db_of(app):
    return app.state.sessionmaker()


# ---------------------------------------------------------------------- 2. bad pairs


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"prompt": 123, "response_a": "x", "response_b": "y"}', "prompt"),
        ('{"prompt": [{"role": "user"}], "response_a": "x", "response_b": "y"}', "content"),
        ('{"prompt": "p", "response_a": null, "response_b": "y"}', "response_a"),
        ('{"prompt": "p", "response_a": {"t": 1}, "response_b": "y"}', "response_a"),
        ("42", "JSON object"),
        ("null", "JSON object"),
        ('"just a string"', "JSON object"),
    ],
)
def test_upload_validates_pairs_with_line_numbers(env, line: str, field: str) -> None:
    app, _ = env
    a = admin_client(app)
    page = a.get("/admin").text
    good = '{"prompt": "p", "response_a": "x", "response_b": "y"}'
    r = a.post(
        "/admin/campaigns",
        data={"csrf": csrf_of(page), "name": "bad", "overlap": "1"},
        files={"pairs": ("bad.jsonl", f"{good}\n{line}\n".encode())},
    )
    assert r.status_code == 400
    err = re.search(r'id="error-add-campaign">([^<]*)<', r.text).group(1)
    assert "bad.jsonl:2" in err and field in err, err  # on the dashboard, beside the form
    with db_of(app) as db:  # nothing half-written
        assert db.scalar(select(Campaign).where(Campaign.name == "bad")) is None


def test_label_create_refuses_a_bad_pair_file(tmp_path) -> None:
    from palate.config import load_config
    from palate.label.campaign import LabelCreateConfig, create_label_campaign

    f = tmp_path / "pairs.jsonl"
    f.write_text(
        '{"prompt": "p", "response_a": "x", "response_b": "y"}\n{"prompt": 1, "response_a": "x", "response_b": "y"}\n'
    )
    cfg = load_config(LabelCreateConfig, None, [f"db={tmp_path / 'l.db'}", "name=c", f"pairs={f}"])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field prompt"):
        create_label_campaign(cfg)


def test_a_bad_stored_pair_does_not_lock_the_rater_out(env) -> None:
    """A pair stored before validation existed renders, and can be skipped."""
    app, ids = env
    with db_of(app) as db:
        db.execute(update(Pair).values(prompt=123))
        db.commit()
    c = sign_in_by_invite(app, ids["invite"])
    page = c.get(f"/campaigns/{ids['camp']}/rate")
    assert page.status_code == 200 and 'id="skip-form"' in page.text and "123" in page.text


def test_campaign_and_user_input_limits(env) -> None:
    app, _ = env
    a = admin_client(app)
    one = b'{"prompt": "p", "response_a": "x", "response_b": "y"}\n'
    for name, overlap, pairs, msg in [
        ("   ", "1", one, "must not be empty"),
        ("two\nlines", "1", one, "control characters"),
        ("big", str(10**20), one, "out of range"),
        ("big2", "1000", one, "overlap 1000"),
        ("empty", "1", b"\n", "no pairs"),
    ]:
        page = a.get("/admin").text
        r = a.post(
            "/admin/campaigns",
            data={"csrf": csrf_of(page), "name": name, "overlap": overlap},
            files={"pairs": ("p.jsonl", pairs)},
        )
        assert r.status_code == 400 and msg in r.text, (name, r.text[-500:])
    r = admin_post(a, "/admin/raters", name="  ")
    assert r.status_code == 400 and "must not be empty" in r.text


# ---------------------------------------------------------------------- 3. invite links


def test_invites_are_hashed_expire_and_can_be_revoked_and_reissued(env) -> None:
    app, ids = env
    with db_of(app) as db:
        rita = db.scalar(select(User).where(User.name == "rita"))
        assert rita.invite_hash == hashlib.sha256(ids["invite"].encode()).hexdigest()
        assert ids["invite"] not in json.dumps(
            [list(map(str, row)) for row in db.execute(select(User.__table__)).all()]
        )  # only the hash at rest
        rita.invite_expires_at = dt.datetime(2000, 1, 1)
        db.commit()
        rita_id = rita.id
    r = TestClient(app).get(f"/invite/{ids['invite']}")
    assert r.status_code == 403 and "expired" in r.text
    c = TestClient(app)
    csrf = csrf_of(c.get("/login").text)
    r = c.post(f"/invite/{ids['invite']}", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403 and "expired" in r.text  # no sign-in by POST either
    a = admin_client(app)
    r = admin_post(a, f"/admin/users/{rita_id}/invite")
    dash = a.get("/admin").text
    new = re.search(r"/invite/([\w-]+)</code>", dash).group(1)
    assert new != ids["invite"] and "/invite/" not in a.get("/admin").text  # shown once
    c = sign_in_by_invite(app, new)
    assert c.get("/").status_code == 200
    admin_post(a, f"/admin/users/{rita_id}/revoke-invite")
    r = TestClient(app).get(f"/invite/{new}")
    assert r.status_code == 403 and "revoked" in r.text
    # replaced (a newer link issued) rather than revoked: unknown
    admin_post(a, f"/admin/users/{rita_id}/invite")
    r = TestClient(app).get(f"/invite/{new}")
    assert r.status_code == 404 and "not valid" in r.text


def test_admin_with_password_cannot_use_an_invite_link(env) -> None:
    app, _ = env
    with db_of(app) as db:
        _, invite, _ = create_user(db, "boss", "admin", password="pw-boss")
    r = TestClient(app).get(f"/invite/{invite}")
    assert r.status_code == 403 and "password" in r.text


def test_deactivating_a_user_ends_sessions_api_and_invites(env) -> None:
    app, ids = env
    c = TestClient(app)
    login(c, "otto", "pw-otto")
    assert c.get("/").status_code == 200
    h = {"Authorization": f"Bearer {ids['otto']}"}
    assert c.post(f"/api/v1/campaigns/{ids['camp']}/next", headers=h).status_code == 200
    a = admin_client(app)
    with db_of(app) as db:
        otto = db.scalar(select(User).where(User.name == "otto")).id
    admin_post(a, f"/admin/users/{otto}/deactivate")
    assert c.get("/", follow_redirects=False).headers["location"] == "/login"
    assert c.post(f"/api/v1/campaigns/{ids['camp']}/next", headers=h).status_code == 401
    page = TestClient(app).get("/login").text
    r = TestClient(app).post("/login", data={"name": "otto", "password": "pw-otto"})
    assert "Wrong name or password" in r.text or r.status_code in (401, 403)
    admin_post(a, f"/admin/users/{otto}/activate")
    login(TestClient(app), "otto", "pw-otto")
    assert page


def test_a_get_of_an_invite_link_does_not_switch_the_session(env) -> None:
    app, ids = env
    c = TestClient(app)
    login(c, "otto", "pw-otto")
    page = c.get(f"/invite/{ids['invite']}").text
    assert "signed in as otto" in page
    assert "otto" in c.get("/").text  # still otto until the button is pressed


# ---------------------------------------------------------------------- 4, 5. sessions, secrets


def test_logout_ends_the_session_even_for_a_copied_cookie(env) -> None:
    app, _ = env
    c = TestClient(app)
    login(c, "otto", "pw-otto")
    copied = dict(c.cookies)
    page = c.get("/").text
    c.post("/logout", data={"csrf": csrf_of(page)})
    thief = TestClient(app, cookies=copied)
    assert thief.get("/", follow_redirects=False).headers["location"] == "/login"


def _cookie_payload(client: TestClient) -> str:
    raw = client.cookies["palate_session"].split(".")[0]
    return base64.b64decode(raw + "=" * (-len(raw) % 4)).decode()


def test_new_secrets_never_travel_in_the_cookie(env) -> None:
    app, _ = env
    a = admin_client(app)
    admin_post(a, "/admin/raters", name="newbie")
    cookie = dict(a.cookies)
    payload = _cookie_payload(a)
    dash = a.get("/admin").text
    token = re.search(r'id="api-token">([^<]+)<', dash).group(1)
    invite = re.search(r"/invite/([\w-]+)</code>", dash).group(1)
    assert token not in payload and invite not in payload
    replay = TestClient(app, cookies=cookie).get("/admin").text  # the cookie from before viewing
    assert token not in replay and invite not in replay


# ---------------------------------------------------------------------- 6. stale slots


def test_abandoned_assignments_are_released_after_the_timeout_and_by_the_admin(env) -> None:
    app, ids = env
    cid = ids["camp"]
    rita = {"Authorization": f"Bearer {ids['rita']}"}
    otto = {"Authorization": f"Bearer {ids['otto']}"}
    c = TestClient(app)
    held = [c.post(f"/api/v1/campaigns/{cid}/next", headers=h).json() for h in (rita, otto)]
    assert held[0]["assignment_id"] != held[1]["assignment_id"]
    with db_of(app) as db:  # rita walked away an hour ago (the campaign's timeout is 30 min)
        db.execute(
            update(Assignment)
            .where(Assignment.id == held[0]["assignment_id"])
            .values(
                created_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
                - dt.timedelta(hours=1)
            )
        )
        db.commit()
    r = c.post(
        f"/api/v1/assignments/{held[1]['assignment_id']}/label", headers=otto, json={"answer": "a"}
    )
    assert r.status_code == 200
    # otto's next call releases rita's stale slot; 3 pairs: otto can still get two more
    got = [c.post(f"/api/v1/campaigns/{cid}/next", headers=otto).json() for _ in range(1)]
    assert got[0]["assignment_id"] != held[0]["assignment_id"]
    late = c.post(
        f"/api/v1/assignments/{held[0]['assignment_id']}/label", headers=rita, json={"answer": "a"}
    )
    assert late.status_code == 409 and "expired" in late.json()["detail"]
    # the admin releases otto's open one at once
    a = admin_client(app)
    admin_post(a, f"/admin/campaigns/{cid}/release", minutes="0")
    with db_of(app) as db:
        statuses = set(db.scalars(select(Assignment.status)))
        assert "open" not in statuses and "expired" in statuses
        assert sorted(p.n_assigned for p in db.scalars(select(Pair))) == [0, 0, 1]
    # rita could still have the pair otto was holding (her own expired one is not served to
    # her again: a rater sees a pair at most once); otto's labelled pair is full
    prog = c.get(f"/api/v1/campaigns/{cid}/progress", headers=rita).json()
    assert prog["remaining_for_me"] == 1


# ---------------------------------------------------------------------- 7. export names


@pytest.mark.parametrize("name", ["Präferenzen ☕", 'say "hi"', "a;b\\c"])
def test_export_works_for_any_campaign_name(env, name: str) -> None:
    app, _ = env
    with db_of(app) as db:
        cid = create_campaign(db, name, [PairIn(prompt="p", response_a="x", response_b="y")]).id
    r = admin_client(app).get(f"/admin/campaigns/{cid}/export")
    assert r.status_code == 200
    header = r.headers["content-disposition"]
    assert header.isascii() and "filename*=UTF-8''" in header


# ---------------------------------------------------------------------- 8. the rest


def test_login_throttling_and_unknown_names_cost_the_same_work(env, monkeypatch) -> None:
    import palate.label.store.users as users

    app, _ = env
    calls: list[str] = []
    real = users.check_password
    monkeypatch.setattr(
        users, "check_password", lambda pw, stored: calls.append(stored or "") or real(pw, stored)
    )
    c = TestClient(app)
    page = c.get("/login").text
    for _ in range(5):
        r = c.post("/login", data={"name": "otto", "password": "x", "csrf": csrf_of(page)})
        assert r.status_code == 401
    r = c.post("/login", data={"name": "otto", "password": "pw-otto", "csrf": csrf_of(page)})
    assert r.status_code == 429 and "Too many" in r.text  # even the right password, for now
    c.post("/login", data={"name": "nobody", "password": "x", "csrf": csrf_of(page)})
    assert calls[-1].startswith("scrypt$")  # an unknown name is checked against a real hash


def test_huge_ids_bad_timings_and_big_bodies_are_refused_cleanly(env) -> None:
    app, ids = env
    c = TestClient(app)
    h = {"Authorization": f"Bearer {ids['rita']}"}
    for path in (f"/api/v1/campaigns/{2**63}/next", f"/api/v1/assignments/{2**64}/skip"):
        assert c.post(path, headers=h).status_code in (404, 422)
    aid = c.post(f"/api/v1/campaigns/{ids['camp']}/next", headers=h).json()["assignment_id"]
    for seconds in ("NaN", "Infinity", "-1"):
        r = c.post(
            f"/api/v1/assignments/{aid}/label",
            headers={**h, "content-type": "application/json"},
            content=f'{{"answer": "a", "seconds": {seconds}}}',
        )
        assert r.status_code == 422, (seconds, r.text)
    big = b'{"answer": "' + b"x" * (20 * 2**20) + b'"}'
    r = c.post(
        f"/api/v1/assignments/{aid}/label",
        content=big,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413  # refused before the 401: the body is never read


def test_security_headers_no_store_and_no_swagger(env) -> None:
    app, _ = env
    c = TestClient(app)
    r = c.get("/login")
    assert r.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert c.get("/api/docs").status_code == 404
    assert c.get("/api/openapi.json").status_code == 200


# ---------------------------------------------------------------------- admin


def test_pause_close_guidelines_raters_and_delete(env) -> None:
    app, ids = env
    cid = ids["camp"]
    a = admin_client(app)
    rita = {"Authorization": f"Bearer {ids['rita']}"}
    c = TestClient(app)
    admin_post(a, f"/admin/campaigns/{cid}/status", status="paused")
    assert c.post(f"/api/v1/campaigns/{cid}/next", headers=rita).status_code == 204
    r = sign_in_by_invite(app, ids["invite"]).get(f"/campaigns/{cid}/rate")
    assert 'id="paused"' in r.text
    admin_post(a, f"/admin/campaigns/{cid}/status", status="active")
    aid = c.post(f"/api/v1/campaigns/{cid}/next", headers=rita).json()["assignment_id"]
    admin_post(a, f"/admin/campaigns/{cid}/status", status="closed")
    r = c.post(f"/api/v1/assignments/{aid}/label", headers=rita, json={"answer": "a"})
    assert r.status_code == 409 and "closed" in r.text
    assert admin_post(a, f"/admin/campaigns/{cid}/status", status="gone").status_code == 400
    admin_post(a, f"/admin/campaigns/{cid}/status", status="active")
    admin_post(a, f"/admin/campaigns/{cid}/guidelines", guidelines="Prefer **short** replies")
    g = sign_in_by_invite(app, ids["invite"]).get(f"/campaigns/{cid}/guidelines").text
    assert "<strong>short</strong>" in g
    with db_of(app) as db:
        otto = db.scalar(select(User).where(User.name == "otto")).id
    admin_post(a, f"/admin/campaigns/{cid}/raters", raters=str(otto))  # otto only
    assert c.post(f"/api/v1/campaigns/{cid}/next", headers=rita).status_code == 403
    otto_h = {"Authorization": f"Bearer {ids['otto']}"}
    assert c.post(f"/api/v1/campaigns/{cid}/next", headers=otto_h).status_code == 200
    r = admin_post(a, f"/admin/campaigns/{cid}/delete", confirm="wrong name")
    assert r.status_code == 400 and "type the campaign" in r.text
    admin_post(a, f"/admin/campaigns/{cid}/delete", confirm="camp")
    with db_of(app) as db:
        assert db.get(Campaign, cid) is None and not db.scalars(select(Pair)).all()
        assert not db.scalars(select(Assignment)).all()


def test_rate_page_shows_what_is_left(env) -> None:
    app, ids = env
    c = sign_in_by_invite(app, ids["invite"])
    page = c.get(f"/campaigns/{ids['camp']}/rate").text
    assert re.search(r'id="remaining">3<', page)
    c.post(
        f"/campaigns/{ids['camp']}/rate",
        data={
            "assignment_id": re.search(r'name="assignment_id" value="(\d+)"', page).group(1),
            "answer": "tie",
            "csrf": csrf_of(page),
        },
    )
    assert re.search(r'id="remaining">2<', c.get(f"/campaigns/{ids['camp']}/rate").text)


def test_cli_access_and_config_show_without_a_stage(tmp_path) -> None:
    from typer.testing import CliRunner

    from palate.cli import app as cli

    db = str(tmp_path / "l.db")
    r = CliRunner().invoke(
        cli, ["label", "user", "--set", f"db={db}", "--set", "name=r1", "--json"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        cli,
        [
            "label",
            "access",
            "--set",
            f"db={db}",
            "--set",
            "name=r1",
            "--set",
            "action=invite",
            "--json",
        ],
    )
    assert r.exit_code == 0 and "/invite/" in r.output, r.output
    r = CliRunner().invoke(cli, ["config", "show"])
    assert r.exit_code == 0 and "stages:" in r.output and "Traceback" not in r.output
