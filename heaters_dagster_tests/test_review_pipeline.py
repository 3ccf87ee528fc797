"""Review actions carried out by the real stages: split at an exact frame, merge of neighbours,
archive deleting files; and a property test over random action sequences."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text

from heaters_dagster.database.models import ReviewEvent
from heaters_dagster.media.synthetic import make_video, read_frame_numbers
from heaters_dagster.review.events import process_pending_events, record_event
from heaters_dagster.state_machine import CLIP_STATES
from heaters_dagster_tests.conftest import TABLES
from heaters_dagster_tests.factories import make_clips, make_video as make_video_row
from heaters_dagster_tests.factories import row_of
from heaters_dagster_tests.pipeline_helpers import assert_tiles, clips_of, current_cut, drive, live_clips

REVIEW_STAGES = {"ingest", "splice", "keyframes", "embedding"}  # stages not driven here


@pytest.fixture(scope="module")
def source(media_dir):
    return make_video(media_dir / "review_source.mp4", (2.0, 2.0, 2.0), fps=24, width=192, height=108,
                      number_frames=True, audio=False)


def _setup_source(db, store, source, spans, state="pending_review"):
    vid = make_video_row(db, state="spliced", frame_count=source.frame_count, fps=24.0)
    key = f"sources/{vid}/normalized.mp4"
    store.put_file(source.path, key)
    with db.session() as s:
        s.execute(text("UPDATE source_videos SET normalized_key = :k WHERE id = :i"), {"k": key, "i": vid})
    ids = make_clips(db, vid, spans, state=state)
    return vid, ids


def _frames_of(path):
    return read_frame_numbers(path)


def _ev(db, clip_id, action, **payload):
    with db.session() as s:
        return record_event(s, clip_id, action, payload, "t").id


def _pass_windows(db):
    """Let every pending split/merge's undo window pass."""
    with db.session() as s:
        s.execute(text("UPDATE clips SET pending_op = jsonb_set(pending_op, '{ready_at}', "
                       "to_jsonb((now() - interval '1 second')::text)) WHERE pending_op IS NOT NULL"))
        s.execute(text("UPDATE review_events SET processed_at = processed_at - interval '1 day' "
                       "WHERE processed_at IS NOT NULL"))


def test_split_merge_archive_run_as_stages(defs, db, store, instance, source, monkeypatch):
    monkeypatch.setenv("HEATERS_UNDO_WINDOW_S", "0")
    vid, (a, b, c) = _setup_source(db, store, source, [(0, 48), (48, 96), (96, 144)])
    _ev(db, b, "split", frame=17)  # clip-relative: absolute 65
    _ev(db, c, "archive")
    process_pending_events(db)
    _pass_windows(db)
    runs = drive(defs, instance, stop_at=REVIEW_STAGES)
    assert all(r.success for r in runs), runs
    assert row_of(db, "clip", b).state == "archived" and row_of(db, "clip", b).file_deleted
    assert row_of(db, "clip", c).state == "archived"
    live = live_clips(db, vid)
    assert [(x.start_frame, x.end_frame, x.origin) for x in live] == [
        (0, 48, "splice"), (48, 65, "split"), (65, 96, "split")]
    part_a, part_b = live[1], live[2]
    assert part_a.parent_clip_ids == [b] and part_a.state == "pending_review"
    # the parts hold exactly the frames of their ranges (numbered frames decoded back)
    assert _frames_of(store.uri(part_a.file_key)) == list(range(48, 65))
    assert _frames_of(store.uri(part_b.file_key)) == list(range(65, 96))

    _ev(db, part_a.id, "merge")  # merge the first split part with clip a
    process_pending_events(db)
    _pass_windows(db)
    assert all(r.success for r in drive(defs, instance, stop_at=REVIEW_STAGES))
    live = live_clips(db, vid)
    assert [(x.start_frame, x.end_frame, x.origin) for x in live] == [(0, 65, "merge"), (65, 96, "split")]
    assert sorted(live[0].parent_clip_ids) == sorted([a, part_a.id])
    assert _frames_of(store.uri(live[0].file_key)) == list(range(0, 65))
    for gone in (a, part_a.id):
        row = row_of(db, "clip", gone)
        assert row.state == "archived" and row.file_key and not store.exists(row.file_key)


ACTIONS = st.sampled_from(["approve", "skip", "archive", "undo", "split", "merge", "group", "tick", "window"])


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking real ffmpeg runs takes minutes
@given(steps=st.lists(st.tuples(ACTIONS, st.integers(0, 7), st.integers(0, 60)), min_size=3, max_size=12))
def test_random_review_sequences_keep_invariants(defs, db_url, store_dir, instance, source, steps):
    from heaters_dagster.database.engine import get_engine
    from heaters_dagster.resources.database import DatabaseResource

    db = DatabaseResource(url=db_url)
    with get_engine(db_url).begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    store = defs.resources["storage"].store
    vid, _ = _setup_source(db, store, source, [(0, 30), (30, 48), (48, 80), (80, 96), (96, 144)])
    frame_count = source.frame_count

    def check() -> None:
        clips = clips_of(db, vid)
        assert all(c.state in CLIP_STATES for c in clips)
        assert_tiles([(c.start_frame, c.end_frame) for c in current_cut(db, vid)], frame_count)
        # live clips never overlap (archived ones leave reviewed holes, nothing else does)
        live = sorted((c.start_frame, c.end_frame) for c in live_clips(db, vid))
        assert all(a[1] <= b[0] for a, b in zip(live, live[1:]))
        with db.session() as s:
            for ev in s.execute(select(ReviewEvent).where(ReviewEvent.processed_at.is_not(None))).scalars():
                assert ev.outcome in ("applied", "rejected")
                assert ev.outcome == "applied" or ev.reason

    def tick() -> None:
        # one event at a time, checking that an applied undo restored the states it names
        while True:
            with db.session() as s:
                nxt = s.execute(select(ReviewEvent.id).where(ReviewEvent.processed_at.is_(None))
                                .order_by(ReviewEvent.id).limit(1)).scalar()
            if nxt is None:
                break
            done = process_pending_events(db, limit=1)
            assert done and done[0].event_id == nxt
            if done[0].action == "undo" and done[0].outcome == "applied":
                with db.session() as s:
                    undone = s.execute(select(ReviewEvent).where(ReviewEvent.undone_by == nxt)).scalar_one()
                    for cid, entry in undone.undo_info.items():
                        assert row_of(db, "clip", int(cid)).state == entry["before"]
            check()
        runs = drive(defs, instance, stop_at=REVIEW_STAGES, max_rounds=6)
        assert all(r.success for r in runs), runs
        check()

    for action, pick, param in steps:
        live = live_clips(db, vid)
        if action == "tick":
            tick()
            continue
        if action == "window":
            _pass_windows(db)
            continue
        clip = live[pick % len(live)]
        payload = {}
        if action == "split":
            payload = {"frame": param}
        elif action == "group":
            payload = {"target_clip_id": live[(pick + 1) % len(live)].id}
        _ev(db, clip.id, action, **payload)
    _pass_windows(db)
    tick()
    shutil.rmtree(store.root / "sources", ignore_errors=True)
