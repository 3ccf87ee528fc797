"""The review page in headless Chromium (Playwright, Debian's /usr/bin/chromium): sign-in by the
address, the clip's video with frame-exact stepping and a split that lands on the frame shown (a
3-minute 30 fps clip; the new clips' boundary frames checked in their files), undo after a reload
and from another tab, two tabs with the same name, group and merge messages, prefetch size, the
page from 390 px to 4K; and no JavaScript console error in any of them.

Runs wherever /usr/bin/chromium (or HEATERS_CHROMIUM) exists, which scripts/setup.sh installs;
skipped only with HEATERS_SKIP_BROWSER=1 or when the browser is missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select, text

from heaters_dagster.database.models import ReviewEvent
from heaters_dagster.media.synthetic import make_video as make_mp4
from heaters_dagster.media.synthetic import NUMBER_BITS, read_frame_numbers
from heaters_dagster.review.app import create_app
from heaters_dagster.review.events import process_pending_events, record_event
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.factories import make_clips, make_video, row_of
from heaters_dagster_tests.review_helpers import add_sprite, simple_layout

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("HEATERS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]
TOKEN = "browser-test-token"
LONG_FPS, LONG_S = 30, 180.0


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


class ServedBytes:
    """ASGI wrapper counting the body bytes the server sent per path (for the prefetch limit)."""

    def __init__(self, app):
        self.app, self.sent = app, []
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry = {"path": scope["path"], "bytes": 0}
        self.sent.append(entry)

        async def counting(message):
            if message["type"] == "http.response.body":
                entry["bytes"] += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)

    def bytes_for(self, path: str) -> int:
        return sum(e["bytes"] for e in self.sent if e["path"] == path)


@pytest.fixture()
def server(db, store_dir):
    import uvicorn

    store = ArtifactStore(str(store_dir))
    app = ServedBytes(create_app(db, store, token=TOKEN))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield SimpleNamespace(base=f"http://127.0.0.1:{port}", store=store, app=app)
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def chromium():
    reason = _skip_reason()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def browser(chromium, monkeypatch):
    """new_page(viewport) in one browser context (tabs share localStorage, not sessionStorage);
    every console error and uncaught exception of every page lands in ``errors``."""
    from heaters_dagster.media.embedding import ClipEmbedder

    def no_model(cls, *a, **k):  # offline CI has no weights: what the page shows then
        raise OSError("no weights in /root/.cache/huggingface/hub (offline)")

    monkeypatch.setattr(ClipEmbedder, "load", classmethod(no_model))
    context = chromium.new_context(viewport={"width": 1400, "height": 900})
    errors: list[str] = []

    def new_page(viewport=None):
        page = context.new_page()
        if viewport:
            page.set_viewport_size(viewport)
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
        return page

    try:
        yield SimpleNamespace(new_page=new_page, errors=errors)
    finally:
        context.close()


@pytest.fixture(scope="module")
def small_mp4s(tmp_path_factory):
    """Two small H.264/AAC clips: 1 s and 1.5 s at 24 fps (their sizes differ)."""
    d = tmp_path_factory.mktemp("small")
    return [make_mp4(d / f"s{i}.mp4", (secs,), fps=24, width=96, height=54, audio=True).path
            for i, secs in enumerate((1.0, 1.5))]


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """A 3-minute 30 fps clip whose frames carry their number (small, so it is quick to make)."""
    d = tmp_path_factory.mktemp("long")
    return make_mp4(d / "long.mp4", (LONG_S,), fps=LONG_FPS, width=192, height=108, audio=True,
                    number_frames=True, crf=28, preset="ultrafast")


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


def _clips_with_video(db, store, files, n, fps=24.0):
    """n adjacent clips of one source, each with a video file (files cycle) and a sprite."""
    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 48, (i + 1) * 48) for i in range(n)], state="pending_review", fps=fps)
    for i, cid in enumerate(ids):
        store.put_file(files[i % len(files)], row_of(db, "clip", cid).file_key)
        add_sprite(db, store, cid, simple_layout(48))
    return vid, ids


def _shows(page, clip_id, timeout=15000):
    page.wait_for_function("id => document.getElementById('clip-id').textContent === '#' + id", arg=clip_id,
                           timeout=timeout)


def _frame_on_screen(page) -> int:
    """Decode the frame number painted into the picture the <video> shows right now."""
    import numpy as np
    from PIL import Image

    from heaters_dagster.media.synthetic import read_frame_number

    box = page.evaluate("""() => { const v = document.getElementById('video'), r = v.getBoundingClientRect();
        return {w: r.width, h: r.height, vw: v.videoWidth, vh: v.videoHeight}; }""")
    png = page.locator("#video").screenshot()
    img = Image.open(io.BytesIO(png)).convert("L")
    sx, sy = img.width / box["w"], img.height / box["h"]
    scale = min(box["w"] / box["vw"], box["h"] / box["vh"])  # object-fit: contain
    cw, ch = box["vw"] * scale, box["vh"] * scale
    x0, y0 = (box["w"] - cw) / 2, (box["h"] - ch) / 2
    img = img.crop((round(x0 * sx), round(y0 * sy), round((x0 + cw) * sx), round((y0 + ch) * sy)))
    return read_frame_number(np.asarray(img))


def _settled_frame(page, timeout=10000) -> int:
    page.wait_for_function("() => document.getElementById('player').dataset.seeking === '0'", timeout=timeout)
    return int(page.locator("#player").get_attribute("data-frame"))


def _no_errors(errors):
    assert not errors, errors


def _ffprobe_frames(path) -> int:
    out = subprocess.run([shutil.which("ffprobe") or "ffprobe", "-v", "error", "-count_frames", "-select_streams",
                          "v:0", "-show_entries", "stream=nb_read_frames,r_frame_rate", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True, timeout=120)
    stream = json.loads(out.stdout)["streams"][0]
    assert stream["r_frame_rate"] == f"{LONG_FPS}/1"
    return int(stream["nb_read_frames"])


# -- tests -------------------------------------------------------------------------------------
def test_sign_in_by_address_then_name(browser, db, server, small_mp4s):
    _, (a, b) = _clips_with_video(db, server.store, small_mp4s, 2)
    page = browser.new_page()
    page.goto(f"{server.base}/?token={TOKEN}")
    _shows(page, a)
    assert "token" not in page.url  # taken out of the address (history.replaceState)
    # The token is kept; only the name is asked for. Until then the page is a read-only preview.
    assert page.locator("#token").is_hidden() and page.locator("#token-have").is_visible()
    assert "enter your name" in page.locator("#login-msg").text_content()
    assert page.evaluate("document.body.classList.contains('readonly')")
    assert row_of(db, "clip", a).lease_owner is None
    page.fill("#reviewer", "alice")
    page.click("#login button[type=submit]")
    page.wait_for_function("() => !document.body.classList.contains('readonly')")
    assert page.locator("#who-name").text_content() == "alice"
    session = page.evaluate("sessionStorage.getItem('heaters.session')")
    assert row_of(db, "clip", a).lease_owner == f"alice#{session}"
    # a reload keeps the sign-in (token for the tab, name for the browser) and the clip
    page.reload()
    _shows(page, a)
    page.wait_for_function("() => !document.body.classList.contains('readonly')")
    assert "token" not in page.url
    # a wrong token in the address is refused with one line, and the page stays read-only
    other = browser.new_page()
    other.goto(f"{server.base}/?token=wrong&reviewer=bob")
    other.wait_for_function("() => document.getElementById('login-msg').textContent.includes('wrong reviewer token')")
    assert other.evaluate("document.body.classList.contains('readonly')") and "token" not in other.url
    _no_errors(browser.errors)


def test_video_frame_exact_stepping_and_split_on_a_3_minute_clip(browser, db, server, long_clip, tmp_path):
    store = server.store
    n = long_clip.frame_count
    assert n == LONG_FPS * LONG_S
    vid = make_video(db, fps=float(LONG_FPS), frame_count=n)
    source_key = f"sources/{vid}/normalized.mp4"
    store.put_file(long_clip.path, source_key)
    with db.session() as s:
        s.execute(text("UPDATE source_videos SET normalized_key = :k WHERE id = :i"), {"k": source_key, "i": vid})
    (cid,) = make_clips(db, vid, [(0, n)], state="pending_review", fps=float(LONG_FPS))
    store.put_file(long_clip.path, row_of(db, "clip", cid).file_key)
    layout = {"cols": 10, "rows": 9, "tile_width": 64, "tile_height": 36, "frame_count": 90, "effective_fps": 0.5,
              "clip_fps": float(LONG_FPS), "clip_duration_s": LONG_S, "sheet_width": 640, "sheet_height": 324}
    add_sprite(db, store, cid, layout)

    page = browser.new_page()
    page.goto(f"{server.base}/?token={TOKEN}&reviewer=vera")
    _shows(page, cid)
    # It plays: the video's own frames at the source rate (every frame presented, not sampled tiles).
    page.wait_for_function("() => Number(document.getElementById('player').dataset.frame) > 5", timeout=15000)
    rate = page.evaluate("""() => new Promise(done => {
        const v = document.getElementById('video'); let first = null;
        function cb(now, m) {
          if (first === null) first = m;
          if (m.mediaTime - first.mediaTime >= 1.0) {
            done({presented: m.presentedFrames - first.presentedFrames, media: (m.mediaTime - first.mediaTime) * 30});
          } else v.requestVideoFrameCallback(cb);
        }
        v.requestVideoFrameCallback(cb); })""")
    print(f"playback: {rate['presented']} frames presented for {rate['media']:.0f} source frames")
    assert rate["presented"] >= 0.5 * rate["media"]
    # Sound: M mutes and unmutes; speeds set the playback rate.
    assert page.evaluate("document.getElementById('video').muted") is False
    page.keyboard.press("m")
    assert page.evaluate("document.getElementById('video').muted") is True
    assert page.locator("#mute").get_attribute("aria-pressed") == "true"
    page.keyboard.press("m")
    page.click("[data-speed='2']")
    assert page.evaluate("document.getElementById('video').playbackRate") == 2
    page.click("[data-speed='1']")

    # Pause, go to frame 0: the split bar says part A would be empty (no "frames 0–-1").
    page.keyboard.press("Space")
    page.wait_for_function("() => document.getElementById('video').paused")
    page.evaluate("""() => { const s = document.getElementById('scrub');
                             s.value = '0'; s.dispatchEvent(new Event('input')); }""")
    assert _settled_frame(page) == 0
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.body.classList.contains('split-mode')")
    assert _settled_frame(page) == 0
    parts = page.locator("#split-parts").text_content()
    assert "would be empty" in parts and "–-1" not in parts

    # Scrub to frame 4000, then step: each arrow press moves exactly one frame, and the picture on
    # screen is the frame the counter names.
    page.evaluate("""() => { const s = document.getElementById('scrub');
                             s.value = '4000'; s.dispatchEvent(new Event('input')); }""")
    assert _settled_frame(page) == 4000
    assert _frame_on_screen(page) == 4000
    for expected in (4001, 4002, 4003):
        page.keyboard.press("ArrowRight")
        assert _settled_frame(page) == expected
        assert _frame_on_screen(page) == expected
    page.keyboard.press("ArrowLeft")
    shown = _settled_frame(page)
    assert shown == 4002 == _frame_on_screen(page)
    assert page.locator("#counter").text_content() == f"frame {shown} / {n}"
    assert page.locator("#split-frame").text_content() == str(shown)
    assert page.locator("#split-parts").text_content() == f"part A: frames 0–{shown - 1} · part B: frames {shown}–{n - 1}"
    # Hovering the scrub bar previews the sprite tile there.
    box = page.locator("#scrub").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#preview:not([hidden])")
    assert abs(int(page.locator("#preview").get_attribute("data-tile")) - 45) <= 1
    page.mouse.move(0, 0)
    page.keyboard.press("Enter")
    _wait(lambda: _events(db, cid, "split"), 10, "the split event")
    assert _events(db, cid, "split")[0].payload == {"frame": shown}
    process_pending_events(db)
    row = row_of(db, "clip", cid)
    assert row.state == "split_pending" and row.pending_op["absolute_frame"] == shown

    # The split stage's own code cuts the parts: their boundary frames are the frames shown.
    from heaters_dagster.pipeline.handlers import split

    values = {"pending_op": row.pending_op, "start_frame": 0, "end_frame": n, "fps": float(LONG_FPS),
              "source_video_id": vid}

    class Item(dict):
        id = cid
        source = {"normalized_key": source_key}

    ctx = SimpleNamespace(store=store, workdir=tmp_path / "work", params={"preset": "ultrafast", "crf": 30},
                          info=lambda *a, **k: None)
    out = split(ctx, Item(values))
    part_a, part_b = (Path(c.file.local_path) for c in out.new_clips)
    assert [(c.start_frame, c.end_frame) for c in out.new_clips] == [(0, shown), (shown, n)]
    assert _ffprobe_frames(part_a) == shown and _ffprobe_frames(part_b) == n - shown
    # (the picture carries the frame number in NUMBER_BITS bits, so it counts modulo 2**NUMBER_BITS)
    frames_a, frames_b = read_frame_numbers(part_a), read_frame_numbers(part_b)
    wrap = 2 ** NUMBER_BITS
    assert frames_a[-1] == (shown - 1) % wrap and frames_b[0] == shown % wrap
    assert frames_a == [i % wrap for i in range(shown)] and frames_b == [i % wrap for i in range(shown, n)]
    _no_errors(browser.errors)


def test_two_tabs_same_name_get_different_clips_and_prefetch_is_bounded(browser, db, server, small_mp4s):
    _, ids = _clips_with_video(db, server.store, small_mp4s, 5)
    tab1 = browser.new_page()
    tab1.goto(f"{server.base}/?token={TOKEN}&reviewer=ann")
    _shows(tab1, ids[0])
    tab2 = browser.new_page()
    tab2.goto(f"{server.base}/?token={TOKEN}&reviewer=ann")
    _shows(tab2, ids[1])
    s1, s2 = (t.evaluate("sessionStorage.getItem('heaters.session')") for t in (tab1, tab2))
    assert s1 != s2
    assert row_of(db, "clip", ids[0]).lease_owner == f"ann#{s1}"
    assert row_of(db, "clip", ids[1]).lease_owner == f"ann#{s2}"
    # tab 1 moves on: it never gets tab 2's clip
    tab1.keyboard.press("s")
    _shows(tab1, ids[2])
    assert row_of(db, "clip", ids[1]).lease_owner == f"ann#{s2}"

    # Prefetch: the next clips' videos, no more than 3x the shown clip's bytes.
    tab1.wait_for_function("() => Number(document.getElementById('prefetch-count').textContent) > 0")
    time.sleep(1.0)
    sizes = {c: server.store.size(row_of(db, "clip", c).file_key) for c in ids}
    current = ids[2]
    others = sum(server.app.bytes_for(f"/api/clips/{c}/video") for c in ids[3:])
    assert 0 < others <= 3 * sizes[current], (others, sizes)
    # The clip now shown was prefetched while the first one played: the player used that download.
    tab1.wait_for_function("() => document.getElementById('video').readyState >= 2")
    assert server.app.bytes_for(f"/api/clips/{current}/video") == sizes[current]
    _no_errors(browser.errors)


def test_undo_after_reload_and_from_another_tab(browser, db, server, small_mp4s):
    _, (a, b, c) = _clips_with_video(db, server.store, small_mp4s, 3)
    page = browser.new_page()
    page.goto(f"{server.base}/?token={TOKEN}&reviewer=uma")
    _shows(page, a)
    page.wait_for_function("() => document.getElementById('player').dataset.frame !== '0'")
    page.keyboard.press("Space")
    page.evaluate("""() => { const s = document.getElementById('scrub');
                             s.value = '20'; s.dispatchEvent(new Event('input')); }""")
    assert _settled_frame(page) == 20
    page.keyboard.press("ArrowRight")  # split mode, frame 21
    assert _settled_frame(page) == 21
    page.keyboard.press("Enter")  # split before frame 21
    _shows(page, b)
    process_pending_events(db)
    assert row_of(db, "clip", a).state == "split_pending"

    page.reload()  # the page's memory is gone; the server remembers
    _shows(page, b)
    page.wait_for_function("() => document.getElementById('history').textContent.includes('split #%d')" % a)
    page.keyboard.press("Control+z")
    _wait(lambda: _events(db, a, "undo"), 10, "the undo event")
    process_pending_events(db)
    assert (row_of(db, "clip", a).state, row_of(db, "clip", a).pending_op) == ("pending_review", None)
    _shows(page, a)  # back on the page

    # Another tab of the same reviewer approves; Ctrl+Z in the first tab takes it back.
    other = browser.new_page()
    other.goto(f"{server.base}/?token={TOKEN}&reviewer=uma")
    _shows(other, b)
    other.keyboard.press("a")
    _wait(lambda: _events(db, b, "approve"), 10, "the approve event")
    process_pending_events(db)
    page.keyboard.press("Control+z")
    _wait(lambda: _events(db, b, "undo"), 10, "the second undo")
    process_pending_events(db)
    assert row_of(db, "clip", b).state == "pending_review"
    page.keyboard.press("Control+z")  # nothing left: says so
    page.wait_for_function("() => [...document.querySelectorAll('.toast')].some(t => t.textContent.includes('nothing to undo'))")
    _no_errors(browser.errors)


def test_group_and_merge_say_what_they_do(browser, db, server, small_mp4s):
    vid, (a, b) = _clips_with_video(db, server.store, small_mp4s, 2)
    page = browser.new_page()
    page.goto(f"{server.base}/?token={TOKEN}&reviewer=gus")
    _shows(page, a)
    # The first clip of a source has nothing to merge with: merge is not offered, and F says why
    # without sending anything or moving on.
    page.wait_for_function("() => document.getElementById('merge-why').textContent !== ''")
    assert page.locator("#merge-why").text_content() == "cannot merge: no live clip right before this one"
    assert "off" in page.locator("[data-command=merge]").get_attribute("class")
    page.keyboard.press("f")
    page.wait_for_function("() => [...document.querySelectorAll('.toast.error')]"
                           ".some(t => t.textContent === 'cannot merge: no live clip right before this one')")
    assert not _events(db, a, "merge") and page.locator("#clip-id").text_content() == f"#{a}"
    # Similar clips without a model: one line, no path, the card keeps its size.
    page.wait_for_function("() => document.getElementById('similar').textContent.includes('unavailable')")
    assert page.locator("#similar").text_content() == "similar clips unavailable: no embedding model"
    assert page.locator(".similar-card").bounding_box()["height"] < 250
    assert ".cache" not in page.evaluate("document.body.innerText")

    # Group: pick b, G shows what will happen (b is not approved), G again confirms.
    page.keyboard.press("i")
    page.keyboard.type(str(b))
    page.keyboard.press("Enter")
    page.wait_for_function("id => document.getElementById('target').textContent === '#' + id", arg=b)
    page.keyboard.press("g")
    page.wait_for_selector("#group-bar:not([hidden])")
    plan = page.locator("#group-plan").text_content()
    assert plan == (f"approve #{a} and put it in a group with #{b}. #{b} is not approved by this: "
                    "it stays pending review for its own review.")
    assert not _events(db, a, "group")
    page.keyboard.press("g")
    _wait(lambda: _events(db, a, "group"), 10, "the group event")
    process_pending_events(db)
    ra, rb = row_of(db, "clip", a), row_of(db, "clip", b)
    assert (ra.state, rb.state) == ("review_approved", "pending_review") and ra.group_id == rb.group_id == min(a, b)
    _shows(page, b)
    page.wait_for_function("() => document.getElementById('clip-state').textContent.includes('in group')")
    # b has a live clip right before it (approved a): merge is offered, named.
    page.wait_for_function("id => document.getElementById('merge-label').textContent === 'Merge with #' + id", arg=a)
    assert page.locator("#merge-why").text_content() == ""

    # A decision the server rejects (the clip was archived meanwhile) comes back as one line.
    with db.session() as s:
        record_event(s, b, "archive", {}, "someone-else")
    process_pending_events(db)
    page.keyboard.press("a")
    _wait(lambda: _events(db, b, "approve"), 10, "the approve event")
    process_pending_events(db)
    page.wait_for_function("() => [...document.querySelectorAll('.toast.error')]"
                           ".some(t => t.textContent.includes('was rejected: clip'))", timeout=15000)
    assert "rejected" in page.locator("#history").text_content()
    _no_errors(browser.errors)


def test_read_only_without_token_and_layout_from_390_px_to_4k(browser, db, server, small_mp4s):
    _, (a, b) = _clips_with_video(db, server.store, small_mp4s, 2)
    page = browser.new_page({"width": 390, "height": 844})
    page.goto(server.base + "/")
    _shows(page, a)
    assert page.evaluate("document.body.classList.contains('readonly')")
    page.keyboard.press("a")
    page.wait_for_selector(".toast.error")
    assert "read-only" in page.locator(".toast.error").first.text_content()
    assert row_of(db, "clip", a).lease_owner is None and not _events(db, a, "approve")
    page.wait_for_function("() => document.getElementById('video').readyState >= 2")

    def fits(p, width):
        return p.evaluate("""w => ({page: document.documentElement.scrollWidth,
            video: document.getElementById('video').getBoundingClientRect().width,
            actions: document.querySelector('.actions').getBoundingClientRect().right})""", width)

    small = fits(page, 390)
    assert small["page"] <= 390 and 300 <= small["video"] <= 390 and small["actions"] <= 390, small
    assert page.locator("[data-command=approve]").is_visible()
    page.set_viewport_size({"width": 3840, "height": 2160})
    big = fits(page, 3840)
    assert big["page"] <= 3840 and big["video"] >= 2000, big
    _no_errors(browser.errors)
