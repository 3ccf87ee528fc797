"""The review web app: token-protected writes, input validation, events end to end, sprites, the
queue as the page sees it; and the page's JavaScript (pure functions under `node --test`, and the
tile -> frame mapping against sprite sheets the real sprite stage made)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from heaters_dagster.database.models import ReviewEvent
from heaters_dagster.review.app import MAX_BODY, create_app
from heaters_dagster.review.events import process_pending_events
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.factories import make_clips, make_video, row_of
from heaters_dagster_tests.review_helpers import (
    NODE, REVIEW_JS, add_sprite, real_sprite, simple_layout, tile_numbers,
)

TOKEN = "s3cret-reviewer-token"
AUTH = {"X-Heaters-Token": TOKEN}


@pytest.fixture()
def store(store_dir):
    return ArtifactStore(str(store_dir))


@pytest.fixture()
def clips(db, store):
    vid = make_video(db)
    ids = make_clips(db, vid, [(0, 48), (48, 96), (96, 144), (144, 192)], state="pending_review")
    for i in ids:
        add_sprite(db, store, i, simple_layout(48))
    return vid, ids


@pytest.fixture()
def client(db, store):
    with TestClient(create_app(db, store, token=TOKEN)) as c:
        yield c


def _events(db) -> int:
    with db.session() as s:
        return s.execute(select(func.count()).select_from(ReviewEvent)).scalar_one()


def _post(client, body, headers=AUTH):
    return client.post("/api/events", json=body, headers=headers)


# -- auth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"X-Heaters-Token": ""}, {"X-Heaters-Token": "wrong"},
                                     {"X-Heaters-Token": TOKEN + "x"}, {"X-Heaters-Token": TOKEN[:-1]}])
def test_writes_refused_without_the_right_token(db, client, clips, headers):
    _, (a, *_rest) = clips
    r = _post(client, {"clip_id": a, "action": "approve", "reviewer": "ann"}, headers=headers)
    assert r.status_code == 403 and "token" in r.json()["error"]
    r = client.post(f"/api/clips/{a}/release", json={"reviewer": "ann"}, headers=headers)
    assert r.status_code == 403
    r = client.post(f"/api/clips/{a}/lease", json={"reviewer": "ann"}, headers=headers)
    assert r.status_code == 403
    assert _events(db) == 0


@pytest.mark.parametrize("token", [None, ""])
def test_every_write_refused_when_no_token_is_configured(db, store, clips, token):
    _, (a, *_rest) = clips
    with TestClient(create_app(db, store, token=token)) as c:
        for headers in ({}, {"X-Heaters-Token": ""}, {"X-Heaters-Token": "anything"}):
            r = _post(c, {"clip_id": a, "action": "approve", "reviewer": "ann"}, headers=headers)
            assert r.status_code == 403
            assert "no reviewer token" in r.json()["error"]
        # Reading still works, read-only: nothing is leased.
        r = c.get("/api/next", params={"reviewer": "ann"}, headers={"X-Heaters-Token": "anything"})
        assert r.status_code == 200 and r.json()["writable"] is False and r.json()["clip"]["id"] == a
    assert _events(db) == 0
    assert row_of(db, "clip", a).lease_owner is None


def test_next_without_token_is_read_only_and_wrong_token_refused(db, client, clips):
    _, (a, *_rest) = clips
    r = client.get("/api/next", params={"reviewer": "ann"})
    assert r.status_code == 200
    body = r.json()
    assert body["clip"]["id"] == a and body["writable"] is False and body["leased"] is False
    assert row_of(db, "clip", a).lease_owner is None
    r = client.get("/api/next", params={"reviewer": "ann"}, headers={"X-Heaters-Token": "nope"})
    assert r.status_code == 403
    assert row_of(db, "clip", a).lease_owner is None


# -- validation --------------------------------------------------------------------------------
BAD_EVENTS = [
    ({"action": "approve", "reviewer": "ann"}, "clip_id"),
    ({"clip_id": "1", "action": "approve", "reviewer": "ann"}, "clip_id"),
    ({"clip_id": True, "action": "approve", "reviewer": "ann"}, "clip_id"),
    ({"clip_id": 1.0, "action": "approve", "reviewer": "ann"}, "clip_id"),
    ({"clip_id": 0, "action": "approve", "reviewer": "ann"}, "clip_id"),
    ({"clip_id": -3, "action": "approve", "reviewer": "ann"}, "clip_id"),
    ({"clip_id": 2**70, "action": "approve", "reviewer": "ann"}, "clip_id"),
    ({"clip_id": 1, "action": "nuke", "reviewer": "ann"}, "action"),
    ({"clip_id": 1, "action": ["approve"], "reviewer": "ann"}, "action"),
    ({"clip_id": 1, "reviewer": "ann"}, "action"),
    ({"clip_id": 1, "action": "approve", "payload": [1], "reviewer": "ann"}, "payload"),
    ({"clip_id": 1, "action": "approve", "payload": {"frame": 3}, "reviewer": "ann"}, "unexpected"),
    ({"clip_id": 1, "action": "split", "payload": {}, "reviewer": "ann"}, "split needs"),
    ({"clip_id": 1, "action": "split", "payload": {"frame": "12"}, "reviewer": "ann"}, "frame"),
    ({"clip_id": 1, "action": "split", "payload": {"frame": 12.5}, "reviewer": "ann"}, "frame"),
    ({"clip_id": 1, "action": "split", "payload": {"frame": True}, "reviewer": "ann"}, "frame"),
    ({"clip_id": 1, "action": "split", "payload": {"frame": -1}, "reviewer": "ann"}, "frame"),
    ({"clip_id": 1, "action": "split", "payload": {"frame": 2**40}, "reviewer": "ann"}, "frame"),
    ({"clip_id": 1, "action": "group", "payload": {}, "reviewer": "ann"}, "group needs"),
    ({"clip_id": 1, "action": "group", "payload": {"target_clip_id": 2**64}, "reviewer": "ann"}, "target"),
    ({"clip_id": 1, "action": "merge", "payload": {"target_clip_id": None}, "reviewer": "ann"}, "target"),
    ({"clip_id": 1, "action": "approve"}, "reviewer"),
    ({"clip_id": 1, "action": "approve", "reviewer": ""}, "reviewer"),
    ({"clip_id": 1, "action": "approve", "reviewer": "<script>"}, "reviewer"),
    ({"clip_id": 1, "action": "approve", "reviewer": "x" * 65}, "reviewer"),
    ({"clip_id": 1, "action": "approve", "reviewer": "ann", "admin": True}, "unexpected"),
]


@pytest.mark.parametrize("body,words", BAD_EVENTS)
def test_malformed_events_are_rejected_with_400_and_not_recorded(db, client, clips, body, words):
    r = _post(client, body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]
    assert _events(db) == 0


def test_non_json_oversized_and_wrong_type_bodies(db, client, clips):
    headers = {**AUTH, "content-type": "application/json"}
    assert client.post("/api/events", content=b"{not json", headers=headers).status_code == 400
    assert client.post("/api/events", content=b"[1, 2]", headers=headers).status_code == 400
    assert client.post("/api/events", content=b"", headers=headers).status_code == 400
    r = client.post("/api/events", content=b"clip_id=1", headers={**AUTH, "content-type": "text/plain"})
    assert r.status_code == 415
    big = json.dumps({"clip_id": 1, "action": "approve", "reviewer": "ann", "payload": {}}).encode()
    big = big[:-1] + b" " * MAX_BODY + b"}"
    assert client.post("/api/events", content=big, headers=headers).status_code == 413

    def chunks():  # no content-length: the limit holds while streaming
        yield b'{"clip_id": 1, "action": "approve", "reviewer": "ann", "pad": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    assert client.post("/api/events", content=chunks(), headers=headers).status_code == 413
    assert _events(db) == 0


def test_ids_in_paths_are_validated(client, clips):
    assert client.get("/api/sprite/abc").status_code == 400
    assert client.get("/api/sprite/-1").status_code == 400
    assert client.get("/api/sprite/99999999999999999999999").status_code == 400
    assert client.get("/api/events/1.5").status_code == 400
    assert client.get("/api/clips/x/neighbours").status_code == 400
    for params in ({"reviewer": "ann", "exclude": "1,x"}, {"reviewer": "ann", "prefer": "0"}, {"reviewer": "<b>"},
                   {"reviewer": "ann", "exclude": ",".join(["1"] * 51)}):
        assert client.get("/api/next", params=params, headers=AUTH).status_code == 400
    assert client.get("/api/next", headers=AUTH).status_code == 400  # leasing needs a reviewer name


# -- events end to end -------------------------------------------------------------------------
def test_event_recorded_then_applied_and_outcome_readable(db, client, clips):
    _, (a, b, c, _d) = clips
    r = _post(client, {"clip_id": a, "action": "approve", "reviewer": "ann"})
    assert r.status_code == 201
    ev = r.json()["id"]
    assert client.get(f"/api/events/{ev}").json()["outcome"] == "pending"
    r = _post(client, {"clip_id": b, "action": "split", "payload": {"frame": 20}, "reviewer": "ann"})
    split_ev = r.json()["id"]
    # Well-formed but meaningless: recorded, then rejected with a reason.
    r = _post(client, {"clip_id": 999_999, "action": "approve", "reviewer": "ann"})
    bad_ev = r.json()["id"]
    assert row_of(db, "clip", a).state == "pending_review"  # recorded, not applied yet

    applied = process_pending_events(db)
    assert [x.event_id for x in applied] == [ev, split_ev, bad_ev]
    assert row_of(db, "clip", a).state == "review_approved"
    rb = row_of(db, "clip", b)
    assert rb.state == "split_pending"
    assert rb.pending_op["frame"] == 20 and rb.pending_op["absolute_frame"] == 48 + 20
    out = client.get(f"/api/events/{ev}").json()
    assert out["outcome"] == "applied" and out["reason"] is None and out["reviewer"] == "ann"
    out = client.get(f"/api/events/{bad_ev}").json()
    assert out == {**out, "outcome": "rejected", "reason": "clip 999999 does not exist"}
    assert client.get("/api/events/123456").status_code == 404

    r = _post(client, {"clip_id": b, "action": "undo", "reviewer": "ann"})
    assert r.status_code == 201
    process_pending_events(db)
    assert row_of(db, "clip", b).state == "pending_review" and row_of(db, "clip", b).pending_op is None


def test_posting_an_event_releases_the_reviewers_lease(db, client, clips):
    _, (a, *_rest) = clips
    assert client.get("/api/next", params={"reviewer": "ann"}, headers=AUTH).json()["clip"]["id"] == a
    assert row_of(db, "clip", a).lease_owner == "ann"
    _post(client, {"clip_id": a, "action": "skip", "reviewer": "ann"})
    assert row_of(db, "clip", a).lease_owner is None


def test_apply_events_runs_a_background_loop(db, store, clips):
    _, (a, *_rest) = clips
    with TestClient(create_app(db, store, token=TOKEN, apply_events=True)) as c:
        ev = _post(c, {"clip_id": a, "action": "archive", "reviewer": "ann"}).json()["id"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get(f"/api/events/{ev}").json()["outcome"] == "pending":
            time.sleep(0.1)
        assert c.get(f"/api/events/{ev}").json()["outcome"] == "applied"
    assert row_of(db, "clip", a).state == "review_archived"


def test_without_apply_events_nothing_is_applied(db, client, clips):
    _, (a, *_rest) = clips
    ev = _post(client, {"clip_id": a, "action": "archive", "reviewer": "ann"}).json()["id"]
    time.sleep(1.2)
    assert client.get(f"/api/events/{ev}").json()["outcome"] == "pending"
    assert row_of(db, "clip", a).state == "pending_review"


# -- sprites -----------------------------------------------------------------------------------
def test_sprite_served_with_cache_headers(db, store, client, clips):
    _, (a, *_rest) = clips
    r = client.get(f"/api/sprite/{a}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    assert r.content[:3] == b"\xff\xd8\xff" and r.content == store.read_bytes(f"clips/{a}/sprite.jpg")
    assert "max-age" in r.headers["cache-control"]
    etag = r.headers["etag"]
    r2 = client.get(f"/api/sprite/{a}", headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b""
    assert r.headers["x-content-type-options"] == "nosniff"


def test_sprite_404s(db, store, client):
    vid = make_video(db)
    bare, gone = make_clips(db, vid, [(0, 48), (48, 96)], state="pending_review")
    add_sprite(db, store, gone, simple_layout(48))
    store.delete(f"clips/{gone}/sprite.jpg")
    assert client.get(f"/api/sprite/{bare}").status_code == 404
    assert client.get(f"/api/sprite/{gone}").status_code == 404
    assert client.get("/api/sprite/424242").status_code == 404


# -- the queue through the API -----------------------------------------------------------------
def test_next_leases_and_prefetches(db, client, clips):
    _, (a, b, c, d) = clips
    body = client.get("/api/next", params={"reviewer": "ann"}, headers=AUTH).json()
    clip = body["clip"]
    assert clip["id"] == a and body["leased"] and body["writable"]
    assert clip["start_frame"] == 0 and clip["end_frame"] == 48 and clip["frame_count"] == 48
    assert clip["fps"] == 24.0 and clip["start_s"] == 0.0 and clip["end_s"] == 2.0
    assert clip["sprite"]["layout"]["frame_count"] == 48 and clip["sprite"]["layout"]["cols"] == 5
    assert clip["sprite"]["url"].startswith(f"/api/sprite/{a}?v=")
    assert body["queue_length"] == 4
    assert [p["id"] for p in body["prefetch"]] == [b, c, d]
    assert client.get(body["prefetch"][0]["sprite"]["url"]).status_code == 200
    assert row_of(db, "clip", a).lease_owner == "ann"
    # A second reviewer gets another clip, never ann's; nor does ann's prefetch include hers.
    other = client.get("/api/next", params={"reviewer": "bob"}, headers=AUTH).json()
    assert other["clip"]["id"] == b and a not in [p["id"] for p in other["prefetch"]]
    # Renew and release through the API.
    r = client.post(f"/api/clips/{a}/lease", json={"reviewer": "ann"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["renewed"] is True
    assert client.post(f"/api/clips/{a}/lease", json={"reviewer": "bob"}, headers=AUTH).status_code == 409
    assert client.post(f"/api/clips/{a}/release", json={"reviewer": "ann"}, headers=AUTH).json()["released"]
    assert row_of(db, "clip", a).lease_owner is None


def test_next_skips_clips_with_unprocessed_events(db, client, clips):
    _, (a, b, c, _d) = clips
    _post(client, {"clip_id": a, "action": "approve", "reviewer": "ann"})
    _post(client, {"clip_id": b, "action": "approve", "reviewer": "bob"})
    body = client.get("/api/next", params={"reviewer": "cy"}, headers=AUTH).json()
    assert body["clip"]["id"] == c
    assert body["queue_length"] == 2


def test_skipped_clips_come_after_pending_ones(db, client, clips):
    _, (a, b, c, d) = clips
    _post(client, {"clip_id": a, "action": "skip", "reviewer": "ann"})
    process_pending_events(db)
    _post(client, {"clip_id": b, "action": "skip", "reviewer": "ann"})
    process_pending_events(db)
    seen = []
    for name in ("r1", "r2", "r3", "r4", "r5"):
        clip = client.get("/api/next", params={"reviewer": name}, headers=AUTH).json()["clip"]
        seen.append(clip["id"] if clip else None)
    assert seen == [c, d, a, b, None]


def test_neighbours_lists_the_live_clips_of_the_source(db, client, clips):
    vid, (a, b, c, d) = clips
    other = make_clips(db, make_video(db), [(0, 48)], state="pending_review")[0]
    _post(client, {"clip_id": d, "action": "archive", "reviewer": "ann"})
    process_pending_events(db)
    body = client.get(f"/api/clips/{b}/neighbours").json()
    assert body["source_video_id"] == vid
    rows = {r["id"]: r for r in body["clips"]}
    assert list(rows) == [a, b, c]  # archived d and the other source's clip are not offered
    assert [rows[i]["relation"] for i in (a, b, c)] == ["previous", "current", "next"]
    assert other not in rows
    assert client.get("/api/clips/999999/neighbours").status_code == 404


# -- the page ----------------------------------------------------------------------------------
def test_page_and_static_files_with_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert '<script src="/static/review.js?v=' in r.text and "{{version}}" not in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    js = client.get("/static/review.js")
    assert js.status_code == 200 and "HeatersReview" in js.text
    assert client.get("/static/review.css").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def _node():
    if NODE is None:
        pytest.skip("node is not installed (the JS unit tests need node >= 18)")
    return NODE


def test_review_js_unit_tests():
    node = _node()
    tests = REVIEW_JS.parents[3] / "heaters_dagster_tests" / "js" / "review.test.cjs"
    proc = subprocess.run([node, "--test", str(tests)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout and "# pass " in proc.stdout


@pytest.mark.parametrize("fps", [24, 30, 60])
def test_tile_to_frame_matches_the_frames_in_real_sprite_sheets(tmp_path, fps):
    """The frame the page reports for each tile is the frame the sprite stage put there (the
    video's frames carry their number; the sheet is made by the real sprite code)."""
    node = _node()
    jpeg, layout, frame_count = real_sprite(tmp_path, fps, 2.0)
    shown = tile_numbers(jpeg, layout)
    script = (f"const R = require({json.dumps(str(REVIEW_JS))});"
              f"const L = {json.dumps(layout)};"
              f"const tiles = [...Array(L.frame_count).keys()];"
              f"console.log(JSON.stringify(tiles.map(i => R.tileToFrame(i, L, {frame_count}))));")
    proc = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60, check=True)
    page = json.loads(proc.stdout)
    assert len(page) == layout["frame_count"] > 10
    assert page == shown
    if fps == 24:
        assert shown == list(range(frame_count))  # tile i is frame i: no off-by-one


def test_access_log_never_shows_the_token():
    import logging

    from heaters_dagster.review.app import RedactTokenFilter

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/?reviewer=ann&token={TOKEN}&x=1", "1.1", 200), None)
    assert RedactTokenFilter().filter(record)
    assert TOKEN not in record.getMessage() and "token=<redacted>&x=1" in record.getMessage()


def test_serve_builds_the_app_and_runs_uvicorn(monkeypatch, db, clips):
    import uvicorn
    from starlette.applications import Starlette

    from heaters_dagster.review import app as review_app

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setattr(review_app, "DatabaseResource", lambda: db)
    review_app.serve(host="127.0.0.1", port=9876, token=TOKEN, apply_events=True)
    (app, kw), = calls
    assert isinstance(app, Starlette) and kw["host"] == "127.0.0.1" and kw["port"] == 9876
    assert app.state.token_configured and app.state.applier is not None
    with TestClient(app) as c:  # the served app answers with the configured token
        r = c.get("/api/next", params={"reviewer": "ann"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["leased"]


# -- sessions, undo history, video, messages ---------------------------------------------------
def test_session_endpoint_checks_the_token(db, store, client):
    assert client.get("/api/session").json()["auth"] == "missing"
    assert client.get("/api/session", headers={"X-Heaters-Token": "no"}).json()["auth"] == "wrong"
    body = client.get("/api/session", headers=AUTH).json()
    assert body["auth"] == "ok" and body["writable"] is True and body["undo_window_s"] > 0
    with TestClient(create_app(db, store, token=None)) as c:
        assert c.get("/api/session", headers=AUTH).json() == {**c.get("/api/session").json(), "auth": "disabled"}


def test_two_sessions_of_one_reviewer_hold_different_clips(db, client, clips):
    _, (a, b, c, _d) = clips
    one = client.get("/api/next", params={"reviewer": "ann", "session": "tab-one-1234"}, headers=AUTH).json()
    two = client.get("/api/next", params={"reviewer": "ann", "session": "tab-two-5678"}, headers=AUTH).json()
    assert (one["clip"]["id"], two["clip"]["id"]) == (a, b)
    assert row_of(db, "clip", a).lease_owner == "ann#tab-one-1234"
    assert a not in [p["id"] for p in two["prefetch"]]
    # a reload of tab one gets its clip back; tab two cannot renew tab one's lease
    again = client.get("/api/next", params={"reviewer": "ann", "session": "tab-one-1234"}, headers=AUTH).json()
    assert again["clip"]["id"] == a
    r = client.post(f"/api/clips/{a}/lease", json={"reviewer": "ann", "session": "tab-two-5678"}, headers=AUTH)
    assert r.status_code == 409
    # an event from tab one releases tab one's lease only
    _post(client, {"clip_id": a, "action": "skip", "reviewer": "ann", "session": "tab-one-1234"})
    assert row_of(db, "clip", a).lease_owner is None and row_of(db, "clip", b).lease_owner == "ann#tab-two-5678"
    bad = client.get("/api/next", params={"reviewer": "ann", "session": "x"}, headers=AUTH)
    assert bad.status_code == 400 and "session" in bad.json()["error"]


def test_undoable_lists_what_an_undo_would_reverse(db, client, clips, monkeypatch):
    _, (a, b, c, d) = clips
    assert client.get("/api/undoable", params={"reviewer": "ann"}).status_code == 403
    e_a = _post(client, {"clip_id": a, "action": "approve", "reviewer": "ann"}).json()["id"]
    e_b = _post(client, {"clip_id": b, "action": "split", "payload": {"frame": 20}, "reviewer": "ann"}).json()["id"]
    e_c = _post(client, {"clip_id": c, "action": "archive", "reviewer": "bob"}).json()["id"]
    listed = client.get("/api/undoable", params={"reviewer": "ann"}, headers=AUTH).json()
    assert [e["id"] for e in listed["events"]] == [e_b, e_a]  # pending events count, newest first
    process_pending_events(db)
    assert [e["id"] for e in client.get("/api/undoable", params={"reviewer": "ann"}, headers=AUTH)
            .json()["events"]] == [e_b, e_a]
    assert [e["id"] for e in client.get("/api/undoable", params={"reviewer": "bob"}, headers=AUTH)
            .json()["events"]] == [e_c]
    # past the split's undo window it is no longer listed (an approve has no window)
    monkeypatch.setenv("HEATERS_UNDO_WINDOW_S", "0")
    time.sleep(0.05)
    ids = [e["id"] for e in client.get("/api/undoable", params={"reviewer": "ann"}, headers=AUTH).json()["events"]]
    assert ids == [e_a]
    monkeypatch.delenv("HEATERS_UNDO_WINDOW_S")
    # once undone it is gone; another reviewer's later decision on the clip hides it too
    _post(client, {"clip_id": a, "action": "undo", "reviewer": "ann"})
    process_pending_events(db)
    assert e_a not in [e["id"] for e in client.get("/api/undoable", params={"reviewer": "ann"},
                                                   headers=AUTH).json()["events"]]
    _post(client, {"clip_id": d, "action": "skip", "reviewer": "ann"})
    process_pending_events(db)
    _post(client, {"clip_id": d, "action": "approve", "reviewer": "bob"})
    process_pending_events(db)
    assert [e["id"] for e in client.get("/api/undoable", params={"reviewer": "ann"}, headers=AUTH)
            .json()["events"]] == [e_b]  # d's skip is no longer ann's to undo


def test_video_is_served_with_range_requests(db, store, client, tmp_path):
    from heaters_dagster.media.synthetic import make_video as make_mp4

    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)], state="pending_review")
    mp4 = make_mp4(tmp_path / "v.mp4", (1.0,), fps=24, width=64, height=36, audio=False)
    key = row_of(db, "clip", cid).file_key
    store.put_file(mp4.path, key)
    data = mp4.path.read_bytes()
    body = client.get("/api/next", params={"reviewer": "ann"}, headers=AUTH).json()
    assert body["clip"]["video"]["bytes"] == len(data)
    url = body["clip"]["video"]["url"]
    full = client.get(url)
    assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-type"] == "video/mp4"
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = client.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert client.get(url, headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416
    assert "media-src 'self'" in full.headers["content-security-policy"]
    store.delete(key)
    r = client.get(url)
    assert r.status_code == 404 and "/" not in r.json()["error"].replace("/api", "")


def test_byte_range_parsing():
    from heaters_dagster.review.http import BadRequest
    from heaters_dagster.review.media_routes import byte_range

    assert byte_range(None, 100) is None and byte_range("bytes=0-", 100) == (0, 100)
    assert byte_range("bytes=10-19", 100) == (10, 20) and byte_range("bytes=90-500", 100) == (90, 100)
    assert byte_range("bytes=-5", 100) == (95, 100) and byte_range("items=1-2", 100) is None
    with pytest.raises(BadRequest):
        byte_range("bytes=100-", 100)


def test_favicon(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml") and b"<svg" in r.content


def test_neighbours_say_whether_merge_is_possible(db, client, clips):
    _, (a, b, c, d) = clips
    first = client.get(f"/api/clips/{a}/neighbours").json()["merge"]
    assert first == {"possible": False, "target": None, "reason": "no live clip right before this one"}
    assert client.get(f"/api/clips/{b}/neighbours").json()["merge"] == {"possible": True, "target": a, "reason": None}
    _post(client, {"clip_id": b, "action": "split", "payload": {"frame": 20}, "reviewer": "ann"})
    process_pending_events(db)
    m = client.get(f"/api/clips/{c}/neighbours").json()["merge"]
    assert m["possible"] is False and m["target"] == b and "split pending" in m["reason"]


def test_similar_without_a_model_is_one_line_without_paths(db, store, client, clips, monkeypatch, caplog):
    from heaters_dagster.media.embedding import ClipEmbedder

    _, (a, *_rest) = clips

    def no_weights(*args, **kwargs):
        raise OSError("cannot load weights from /root/.cache/huggingface/hub/models--x/snapshots/abc: " + "x" * 500)

    from heaters_dagster.review import similar

    calls = []
    monkeypatch.setattr(ClipEmbedder, "load", classmethod(lambda cls, *a, **k: calls.append(1) or no_weights()))
    monkeypatch.setattr(similar, "_load_failures", {})
    with caplog.at_level("WARNING", logger="heaters.review"):
        r = client.get(f"/api/clips/{a}/similar")
        r2 = client.get(f"/api/clips/{a}/similar")
    assert r.status_code == 200
    assert r.json() == {"clip_id": a, "clips": [], "unavailable": "similar clips unavailable: no embedding model"}
    assert r2.json() == r.json() and len(calls) == 1  # a failed load is not retried for every clip
    assert "/root/.cache" in caplog.text  # the detail is in the server log
