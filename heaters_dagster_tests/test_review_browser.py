"""The review page in headless Chromium: load, play/pause, approve, split at the shown frame, undo.

Runs wherever /usr/bin/chromium (or HEATERS_CHROMIUM) exists, which scripts/setup.sh installs;
skipped only with HEATERS_SKIP_BROWSER=1 or when the browser is missing.
"""

from __future__ import annotations

import io
import math
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from heaters_dagster.database.models import ReviewEvent
from heaters_dagster.review.app import create_app
from heaters_dagster.review.events import process_pending_events
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.factories import make_clips, make_video, row_of
from heaters_dagster_tests.review_helpers import add_sprite, real_sprite, simple_layout, tile_numbers

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HEATERS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"


def _skip_reason() -> str | None:
    if os.environ.get("HEATERS_SKIP_BROWSER") == "1":
        return "HEATERS_SKIP_BROWSER=1"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (scripts/setup.sh installs chromium)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(db, store_dir):
    import uvicorn

    store = ArtifactStore(str(store_dir))
    app = create_app(db, store, token=TOKEN)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", store
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def browser_page():
    reason = _skip_reason()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def _wait(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _events(db, clip_id, action):
    with db.session() as s:
        stmt = select(ReviewEvent).where(ReviewEvent.clip_id == clip_id, ReviewEvent.action == action)
        return s.execute(stmt).scalars().all()


def _shown_frame_number(page) -> int:
    """Decode the frame number painted into the picture the player shows right now."""
    import numpy as np
    from PIL import Image

    from heaters_dagster.media.synthetic import read_frame_number

    png = page.locator("#player").screenshot()
    return read_frame_number(np.asarray(Image.open(io.BytesIO(png)).convert("L")))


def test_review_page_end_to_end(browser_page, db, server, tmp_path):
    base, store = server
    page, errors = browser_page

    # Clip 1: 24 fps, a Pillow sheet with numbered tiles. Clip 2: a real 60 fps clip whose frames
    # carry their number, with the sheet made by the sprite stage (24 fps sampling, so tiles and
    # frames differ). Clip 3: what comes after.
    v1 = make_video(db)
    c1 = make_clips(db, v1, [(0, 48)], state="pending_review")[0]
    add_sprite(db, store, c1, simple_layout(48))
    jpeg, layout, n60 = real_sprite(tmp_path / "media", 60, 2.0)
    v2 = make_video(db, fps=60.0, frame_count=10_000)
    c2 = make_clips(db, v2, [(600, 600 + n60)], state="pending_review", fps=60.0)[0]
    add_sprite(db, store, c2, layout, jpeg)
    c3 = make_clips(db, v2, [(600 + n60, 700 + n60)], state="pending_review", fps=60.0)[0]
    add_sprite(db, store, c3, simple_layout(40, 60.0, cols=8))
    frames_in_tiles = tile_numbers(jpeg, layout)

    page.goto(f"{base}/?token={TOKEN}&reviewer=alice")
    page.wait_for_function("() => document.getElementById('clip-id').textContent === '#%d'" % c1)
    assert "token" not in page.url  # the token moved to sessionStorage
    page.wait_for_function("() => !document.getElementById('player').classList.contains('loading')")
    assert page.locator("#queue-length").text_content() == "3"
    assert row_of(db, "clip", c1).lease_owner == "alice"
    background = page.evaluate("document.getElementById('player').style.backgroundImage")
    assert background.startswith(f'url("/api/sprite/{c1}?v=')

    # Space toggles play: the tile moves while playing and stands still while paused.
    def tile():
        return int(page.locator("#player").get_attribute("data-tile"))

    t0 = tile()
    _wait(lambda: tile() != t0, 5, "playback to advance")
    page.keyboard.press("Space")
    page.wait_for_function("() => document.getElementById('play').getAttribute('aria-label') === 'play'")
    paused_at = tile()
    time.sleep(0.5)
    assert tile() == paused_at
    page.keyboard.press("Space")
    _wait(lambda: tile() != paused_at, 5, "playback to resume")
    counter = page.locator("#counter").text_content()
    assert counter.startswith("frame ") and counter.endswith(" / 48")

    # A approves; the next clip appears.
    page.keyboard.press("a")
    page.wait_for_function("() => document.getElementById('clip-id').textContent === '#%d'" % c2)
    assert len(_events(db, c1, "approve")) == 1
    process_pending_events(db)
    assert row_of(db, "clip", c1).state == "review_approved"
    page.wait_for_function("() => !document.getElementById('player').classList.contains('loading')")

    # Scrub to tile 10, then -> -> (split mode) and Enter: the split frame is the frame shown.
    page.keyboard.press("Space")  # pause
    page.evaluate("""() => { const s = document.getElementById('scrub');
                             s.value = '10'; s.dispatchEvent(new Event('input')); }""")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.body.classList.contains('split-mode')")
    assert tile() == 12
    shown = int(page.locator("#player").get_attribute("data-frame"))
    expected = math.ceil(12.5 * 60 / 24) - 1  # ffmpeg's fps filter puts frame 31 in tile 12
    assert shown == expected == frames_in_tiles[12]
    assert _shown_frame_number(page) == shown  # the picture on screen is that frame
    assert page.locator("#counter").text_content() == f"frame {shown} / {n60}"
    assert page.locator("#split-frame").text_content() == str(shown)
    assert page.locator("#split-abs").text_content() == str(600 + shown)
    page.screenshot(path=str(tmp_path / "split-mode.png"))
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('clip-id').textContent === '#%d'" % c3)
    process_pending_events(db)
    r2 = row_of(db, "clip", c2)
    assert r2.state == "split_pending"
    assert r2.pending_op["frame"] == shown
    assert r2.pending_op["absolute_frame"] == r2.start_frame + shown == 600 + 31

    # Ctrl+Z undoes the split: the clip is back for review, and back on the page.
    page.keyboard.press("Control+z")
    _wait(lambda: _events(db, c2, "undo"), 10, "the undo event")
    process_pending_events(db)
    r2 = row_of(db, "clip", c2)
    assert r2.state == "pending_review" and r2.pending_op is None
    page.wait_for_function("() => document.getElementById('clip-id').textContent === '#%d'" % c2,
                           timeout=15000)
    page.wait_for_function("() => document.querySelector('#history li em') !== null")
    assert "undone" in page.locator("#history").text_content()
    assert row_of(db, "clip", c2).lease_owner == "alice"
    assert row_of(db, "clip", c3).lease_owner is None  # one lease per reviewer
    assert not errors, errors


def test_rejected_event_reason_is_shown_and_read_only_without_token(browser_page, db, server):
    base, store = server
    page, errors = browser_page
    vid = make_video(db)
    a, b = make_clips(db, vid, [(0, 48), (48, 96)], state="pending_review")
    for c in (a, b):
        add_sprite(db, store, c, simple_layout(48))

    # Without a token the page is read-only: it shows the clip but leases nothing and sends nothing.
    page.goto(base + "/")
    page.wait_for_function("() => document.getElementById('clip-id').textContent === '#%d'" % a)
    assert page.evaluate("document.body.classList.contains('readonly')")
    page.keyboard.press("a")
    page.wait_for_selector(".toast.error")
    assert "read-only" in page.locator(".toast.error").first.text_content()
    assert row_of(db, "clip", a).lease_owner is None and not _events(db, a, "approve")

    # Sign in with a wrong token: refused, still read-only.
    page.fill("#reviewer", "bob")
    page.fill("#token", "not-the-token")
    page.click("#login button[type=submit]")
    page.wait_for_function("() => document.getElementById('login-msg').textContent.includes('token')")
    assert not page.locator("#login").is_hidden()

    # The right token; F on the first clip of a source has nothing to merge with: the page shows
    # the applier's reason once the event is rejected.
    page.fill("#reviewer", "bob")
    page.fill("#token", TOKEN)
    page.click("#login button[type=submit]")
    page.wait_for_function("() => !document.body.classList.contains('readonly')")
    page.wait_for_function("() => document.getElementById('clip-id').textContent === '#%d'" % a)
    page.keyboard.press("f")
    page.wait_for_function("() => document.getElementById('clip-id').textContent === '#%d'" % b)
    _wait(lambda: _events(db, a, "merge"), 10, "the merge event")
    process_pending_events(db)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.toast.error')]"
        ".some(t => t.textContent.includes('no live clip'))",
        timeout=15000)
    assert "rejected" in page.locator("#history").text_content()

    # ID mode: I, type the previous clip's id, G groups the current clip with it.
    page.keyboard.press("i")
    page.keyboard.type(str(a))
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('target').textContent === '#%d'" % a)
    page.keyboard.press("g")
    _wait(lambda: _events(db, b, "group"), 10, "the group event")
    assert _events(db, b, "group")[0].payload == {"target_clip_id": a}
    process_pending_events(db)
    ra, rb = row_of(db, "clip", a), row_of(db, "clip", b)
    assert ra.state == rb.state == "review_approved" and ra.group_id == rb.group_id == min(a, b)
    assert not errors, errors
