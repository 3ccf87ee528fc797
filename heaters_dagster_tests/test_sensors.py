"""Stage sensors through build_sensor_context with a test instance: partitions registered, each
ready item requested once across ticks, again after a deliberate re-queue, batched into ranges."""

from __future__ import annotations

import dataclasses

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from sqlalchemy import text

from heaters_dagster.sensors.factory import build_stage_sensor, contiguous_chunks
from heaters_dagster.stages import get_stage
from heaters_dagster.state_machine import transition
from heaters_dagster_tests.factories import make_clips, make_video

SPRITE = get_stage("sprite")


def _tick(sensor, instance, db, cursor):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"database": db}) as ctx:
        result = sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def _partitions(req):
    if req.partition_key:
        return [req.partition_key]
    return [req.tags[ASSET_PARTITION_RANGE_START_TAG], req.tags[ASSET_PARTITION_RANGE_END_TAG]]


def test_registers_partitions_and_requests_each_ready_item_once(db, instance):
    sensor = build_stage_sensor(SPRITE)
    vid = make_video(db)
    ids = make_clips(db, vid, [(0, 24), (24, 48), (48, 72)])
    make_clips(db, vid, [(72, 96)], state="pending_review")  # not ready: never requested

    r1 = _tick(sensor, instance, db, None)
    assert instance.get_dynamic_partitions(SPRITE.partitions_name) == [str(i) for i in ids]
    assert len(r1.run_requests) == 1  # one run covers all three clips
    assert _partitions(r1.run_requests[0]) == [str(ids[0]), str(ids[-1])]

    r2 = _tick(sensor, instance, db, r1.cursor)  # nothing changed: nothing requested
    assert not r2.run_requests
    r3 = _tick(sensor, instance, db, r2.cursor)
    assert not r3.run_requests

    (new,) = make_clips(db, vid, [(96, 120)])  # a newly ready clip alone is requested
    r4 = _tick(sensor, instance, db, r3.cursor)
    assert [_partitions(r) for r in r4.run_requests] == [[str(new)]]
    assert r4.run_requests[0].run_key == SPRITE.run_key(new, 0)


def test_deliberate_requeue_requests_again_with_new_run_key(db, instance):
    sensor = build_stage_sensor(SPRITE)
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    r1 = _tick(sensor, instance, db, None)
    assert [r.run_key for r in r1.run_requests] == [SPRITE.run_key(cid, 0)]
    with db.session() as s:  # the run fails the clip, an operator re-queues it
        transition(s, "clip", cid, "spliced", "generating_sprite")
        transition(s, "clip", cid, "generating_sprite", "sprite_failed", error="x")
    r2 = _tick(sensor, instance, db, r1.cursor)
    assert not r2.run_requests
    with db.session() as s:
        transition(s, "clip", cid, "sprite_failed", "spliced", bump_version=True, clear_error=True)
    r3 = _tick(sensor, instance, db, r2.cursor)
    assert [r.run_key for r in r3.run_requests] == [SPRITE.run_key(cid, 1)]
    assert instance.get_dynamic_partitions(SPRITE.partitions_name) == [str(cid)]  # not registered twice


def test_in_flight_item_returning_to_ready_for_a_retry_is_not_requested_again(db, instance):
    sensor = build_stage_sensor(SPRITE)
    vid = make_video(db)
    (cid,) = make_clips(db, vid, [(0, 24)])
    r1 = _tick(sensor, instance, db, None)
    with db.session() as s:  # claimed, then a transient error puts it back (RetryPolicy retries it)
        transition(s, "clip", cid, "spliced", "generating_sprite")
    r2 = _tick(sensor, instance, db, r1.cursor)
    with db.session() as s:
        transition(s, "clip", cid, "generating_sprite", "spliced", error="transient", bump_retry=True)
    r3 = _tick(sensor, instance, db, r2.cursor)
    assert not r2.run_requests and not r3.run_requests


def test_many_ready_items_are_split_into_ranges_of_bounded_size(db, instance):
    stage = dataclasses.replace(SPRITE, max_partitions_per_run=4)
    sensor = build_stage_sensor(stage)
    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 24, i * 24 + 24) for i in range(10)])
    r = _tick(sensor, instance, db, None)
    ranges = [_partitions(q) for q in r.run_requests]
    assert ranges == [[str(ids[0]), str(ids[3])], [str(ids[4]), str(ids[7])], [str(ids[8]), str(ids[9])]]
    assert len({q.run_key for q in r.run_requests}) == 3


def test_contiguous_chunks_never_span_a_gap():
    order = ["1", "2", "3", "4", "5", "6"]
    assert contiguous_chunks(order, ["1", "2", "4", "5", "6"], 2) == [["1", "2"], ["4", "5"], ["6"]]
    assert contiguous_chunks(order, ["6", "1"], 10) == [["1"], ["6"]]


def test_video_stage_sensor_watches_videos(db, instance):
    sensor = build_stage_sensor(get_stage("ingest"))
    v1 = make_video(db, state="new")
    make_video(db, state="spliced")
    r = _tick(sensor, instance, db, None)
    assert [q.partition_key for q in r.run_requests] == [str(v1)]
    assert instance.get_dynamic_partitions("videos") == [str(v1)]


def test_ready_clips_scattered_in_the_shared_set_share_one_run_bridging_the_others(db, instance):
    """Approved clips between skipped ones (one shared clip partition set): one keyframes run over
    the range instead of one run per approved clip; a range never bridges a clip in flight."""
    keyframes = get_stage("keyframes")
    vid = make_video(db)
    ids = [make_clips(db, vid, [(i * 24, i * 24 + 24)], state="review_approved" if i % 2 == 0 else "review_skipped")[0]
           for i in range(10)]
    approved = ids[::2]
    instance.add_dynamic_partitions("clips", [str(i) for i in ids])  # as splice registers them
    r = _tick(build_stage_sensor(keyframes), instance, db, None)
    assert [_partitions(q) for q in r.run_requests] == [[str(ids[0]), str(ids[8])]]
    assert r.run_requests[0].tags["heaters/items"] == "5"
    strict = _tick(build_stage_sensor(dataclasses.replace(keyframes, max_gap=0)), instance, db, None)
    assert len(strict.run_requests) == len(approved)  # what exact ranges would cost

    with db.session() as s:  # clip 4 is now being keyframed by another run
        transition(s, "clip", approved[2], "review_approved", "keyframing")
    r = _tick(build_stage_sensor(keyframes), instance, db, None)
    assert [_partitions(q) for q in r.run_requests] == [[str(approved[0]), str(approved[1])],
                                                        [str(approved[3]), str(approved[4])]]


def test_bridging_is_bounded_by_max_gap():
    order = [str(i) for i in range(1, 21)]
    assert contiguous_chunks(order, ["1", "5", "9"], 10, max_gap=6) == [["1", "5", "9"]]
    assert contiguous_chunks(order, ["1", "5", "9"], 10, max_gap=5) == [["1", "5"], ["9"]]
    assert contiguous_chunks(order, ["1", "2", "3"], 2, max_gap=10) == [["1", "2"], ["3"]]
    assert contiguous_chunks(order, ["1", "3", "5"], 10, max_gap=10, barriers=["4"]) == [["1", "3"], ["5"]]


# -- batching (HEATERS_BATCH_WAIT_S / HEATERS_BATCH_SIZE) ------------------------------------------
def _batch_tick(instance, db, cursor, now, stage=SPRITE):
    from heaters_dagster.sensors.factory import evaluate_stage_sensor

    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"database": db}) as ctx:
        result = evaluate_stage_sensor(ctx, stage, db, now=now)
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def _range_keys(req, instance, stage=SPRITE):
    keys = instance.get_dynamic_partitions(stage.partitions_name)
    a, *b = _partitions(req)
    return keys[keys.index(a):keys.index(b[0] if b else a) + 1]


def _requested_ids(result, instance, stage=SPRITE):
    keys = instance.get_dynamic_partitions(stage.partitions_name)
    out = []
    for req in result.run_requests or []:
        a, *b = _partitions(req)
        lo, hi = keys.index(a), keys.index(b[0] if b else a)
        out.extend(int(k) for k in keys[lo:hi + 1])
    return out


def test_items_arriving_within_the_batch_window_share_one_run_and_none_is_requested_twice(db, instance,
                                                                                            monkeypatch):
    monkeypatch.setenv("HEATERS_BATCH_WAIT_S", "10")
    vid = make_video(db)
    (running,) = make_clips(db, vid, [(0, 24)])
    r0 = _batch_tick(instance, db, None, now=990.0)  # nothing in flight: requested at once
    assert _requested_ids(r0, instance) == [running]
    first = make_clips(db, vid, [(24, 48), (48, 60)])  # ready while that run is in flight
    r1 = _batch_tick(instance, db, r0.cursor, now=1000.0)  # the window opens: nothing requested yet
    assert not r1.run_requests and "collecting" in r1.skip_reason.skip_message
    second = make_clips(db, vid, [(60, 72), (72, 96), (96, 120)])  # more arrive within the window
    r2 = _batch_tick(instance, db, r1.cursor, now=1006.0)
    assert not r2.run_requests
    r3 = _batch_tick(instance, db, r2.cursor, now=1010.5)  # the window is over: one run for all five
    assert len(r3.run_requests) == 1
    assert sorted(_requested_ids(r3, instance)) == sorted(first + second)
    # Later ticks never request them again, whatever the clock says.
    r4 = _batch_tick(instance, db, r3.cursor, now=1030.0)
    r5 = _batch_tick(instance, db, r4.cursor, now=1100.0)
    assert not r4.run_requests and not r5.run_requests
    # While those are in flight, a newly ready clip opens a new window of its own.
    (late,) = make_clips(db, vid, [(120, 144)])
    r6 = _batch_tick(instance, db, r5.cursor, now=1101.0)
    assert not r6.run_requests
    r7 = _batch_tick(instance, db, r6.cursor, now=1111.0)
    assert _requested_ids(r7, instance) == [late]
    # Once nothing of the stage is in flight any more, a ready clip goes at the next tick.
    with db.session() as s:
        for cid in (running, *first, *second, late):
            transition(s, "clip", cid, "spliced", "sprite_failed")
    (alone,) = make_clips(db, vid, [(144, 168)])
    r8 = _batch_tick(instance, db, r7.cursor, now=1112.0)
    assert _requested_ids(r8, instance) == [alone]


def test_embedding_holds_newly_ready_clips_until_its_run_in_flight_ends(db, instance, monkeypatch):
    """A run of the embedding stage loads the model: clips keyframed while one is in flight wait for
    it (up to hold_while_in_flight_s) and share the next run, with no batching window configured."""
    monkeypatch.delenv("HEATERS_BATCH_WAIT_S", raising=False)
    emb = get_stage("embedding")
    assert emb.hold_while_in_flight_s >= 30
    vid = make_video(db)
    (running,) = make_clips(db, vid, [(0, 24)], state="keyframed")
    r0 = _batch_tick(instance, db, None, now=0.0, stage=emb)  # nothing in flight: at once
    assert _requested_ids(r0, instance, emb) == [running]
    waiting = make_clips(db, vid, [(24, 48), (48, 72)], state="keyframed")
    r1 = _batch_tick(instance, db, r0.cursor, now=5.0, stage=emb)
    r2 = _batch_tick(instance, db, r1.cursor, now=5.0 + emb.hold_while_in_flight_s / 2, stage=emb)
    assert not r1.run_requests and not r2.run_requests
    with db.session() as s:  # the run in flight ends
        transition(s, "clip", running, "keyframed", "embedding")
        transition(s, "clip", running, "embedding", "embedded")
    r3 = _batch_tick(instance, db, r2.cursor, now=6.0 + emb.hold_while_in_flight_s / 2, stage=emb)
    assert len(r3.run_requests) == 1 and sorted(_requested_ids(r3, instance, emb)) == waiting
    # a run that never ends does not hold the next clips for longer than the hold
    (late,) = make_clips(db, vid, [(72, 96)], state="keyframed")
    r4 = _batch_tick(instance, db, r3.cursor, now=100.0, stage=emb)
    r5 = _batch_tick(instance, db, r4.cursor, now=100.0 + emb.hold_while_in_flight_s, stage=emb)
    assert not r4.run_requests and _requested_ids(r5, instance, emb) == [late]
    assert get_stage("sprite").hold_while_in_flight_s == 0  # ffmpeg stages request at once


def test_a_full_batch_is_requested_at_once_and_without_a_window_every_tick_requests(db, instance, monkeypatch):
    monkeypatch.setenv("HEATERS_BATCH_WAIT_S", "60")
    monkeypatch.setenv("HEATERS_BATCH_SIZE", "3")
    vid = make_video(db)
    (running,) = make_clips(db, vid, [(0, 12)])
    r0 = _batch_tick(instance, db, None, now=0.0)
    assert _requested_ids(r0, instance) == [running]
    ids = make_clips(db, vid, [(12, 24), (24, 48), (48, 72)])
    r1 = _batch_tick(instance, db, r0.cursor, now=1.0)  # three ready = a full batch: no waiting
    assert sorted(_requested_ids(r1, instance)) == ids
    monkeypatch.setenv("HEATERS_BATCH_WAIT_S", "0")
    (more,) = make_clips(db, vid, [(72, 96)])
    r2 = _batch_tick(instance, db, r1.cursor, now=2.0)  # runs in flight, but no window
    assert _requested_ids(r2, instance) == [more]


def test_stage_sensors_tick_at_every_turn_of_the_sensor_daemon(monkeypatch):
    """Dagster's sensor daemon turns every 5 s and skips a sensor whose interval has not passed since
    its last tick started; at an interval of exactly 5 that is every other turn (10 s). The stage
    sensors ask for 1 s (HEATERS_SENSOR_INTERVAL_S), the run-status sensors too."""
    from dagster._daemon.sensor import MIN_INTERVAL_LOOP_TIME

    from heaters_dagster.sensors.factory import build_stage_sensors
    from heaters_dagster.sensors.recovery import release_canceled_runs, release_failed_runs

    monkeypatch.delenv("HEATERS_SENSOR_INTERVAL_S", raising=False)
    sensors = build_stage_sensors()
    assert sensors and all(s.minimum_interval_seconds < MIN_INTERVAL_LOOP_TIME for s in sensors)
    assert release_failed_runs.minimum_interval_seconds < MIN_INTERVAL_LOOP_TIME
    assert release_canceled_runs.minimum_interval_seconds < MIN_INTERVAL_LOOP_TIME
    monkeypatch.setenv("HEATERS_SENSOR_INTERVAL_S", "30")
    assert {s.minimum_interval_seconds for s in build_stage_sensors()} == {30}


def _add_run(instance, stage, status):
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.test_utils import create_run_for_test

    from heaters_dagster.assets.factory import job_name

    origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("heaters"), "__repository__"),
                             job_name(stage))
    run = create_run_for_test(instance, job_name=job_name(stage), status=status, remote_job_origin=origin)
    assert instance.get_run_by_id(run.run_id).status == status
    return run


def test_ready_items_wait_while_a_run_of_the_stage_is_queued_then_go_in_one_run(db, instance, monkeypatch):
    """A run requested while another run of the stage is still queued would only queue behind it:
    the sensor holds the items (however long the queue) until that run has started, then requests
    one run for all of them; a queued run of another stage holds nothing."""
    monkeypatch.delenv("HEATERS_BATCH_WAIT_S", raising=False)
    keyframes = get_stage("keyframes")
    vid = make_video(db)
    (first,) = make_clips(db, vid, [(0, 24)], state="review_approved")
    r0 = _batch_tick(instance, db, None, now=0.0, stage=keyframes)
    assert _requested_ids(r0, instance, keyframes) == [first]
    queued = _add_run(instance, keyframes, dg.DagsterRunStatus.QUEUED)  # r0's run, waiting for the pool
    _add_run(instance, SPRITE, dg.DagsterRunStatus.QUEUED)
    later = []
    cursor = r0.cursor
    for i, now in enumerate((5.0, 60.0, 600.0)):  # approvals arriving one by one, for minutes
        later += make_clips(db, vid, [(24 + 24 * i, 48 + 24 * i)], state="review_approved")
        r = _batch_tick(instance, db, cursor, now=now, stage=keyframes)
        assert not r.run_requests and "until run" in r.skip_reason.skip_message, r.skip_reason
        cursor = r.cursor
    instance.handle_run_event(queued.run_id, dg.DagsterEvent(  # the queued run is dequeued and starts
        event_type_value=dg.DagsterEventType.RUN_START.value, job_name=queued.job_name))
    with db.session() as s:  # ... and claims its clip
        transition(s, "clip", first, "review_approved", "keyframing")
    assert instance.get_run_by_id(queued.run_id).status == dg.DagsterRunStatus.STARTED
    r = _batch_tick(instance, db, cursor, now=601.0, stage=keyframes)
    assert len(r.run_requests) == 1 and sorted(_requested_ids(r, instance, keyframes)) == sorted(later)
    r2 = _batch_tick(instance, db, r.cursor, now=602.0, stage=keyframes)
    assert not r2.run_requests  # never twice
    # A full batch is not held.
    monkeypatch.setenv("HEATERS_BATCH_SIZE", "2")
    _add_run(instance, keyframes, dg.DagsterRunStatus.QUEUED)
    more = make_clips(db, vid, [(200, 224), (224, 248)], state="review_approved")
    r3 = _batch_tick(instance, db, r2.cursor, now=603.0, stage=keyframes)
    assert sorted(_requested_ids(r3, instance, keyframes)) == sorted(more)


def test_embedding_waits_for_keyframes_still_in_flight_within_its_hold(db, instance, monkeypatch):
    """The first keyframed clips do not start an embedding run (and its model load) of their own
    while keyframes still has clips in progress or approved: they wait for the rest, at most
    hold_while_in_flight_s; with keyframes idle they go at the next tick."""
    monkeypatch.delenv("HEATERS_BATCH_WAIT_S", raising=False)
    emb = get_stage("embedding")
    vid = make_video(db)
    early = make_clips(db, vid, [(0, 24), (24, 48)], state="keyframed")
    (busy,) = make_clips(db, vid, [(48, 72)], state="keyframing")
    r0 = _batch_tick(instance, db, None, now=0.0, stage=emb)
    r1 = _batch_tick(instance, db, r0.cursor, now=emb.hold_while_in_flight_s / 2, stage=emb)
    assert not r0.run_requests and not r1.run_requests and "collecting" in r1.skip_reason.skip_message
    with db.session() as s:  # keyframes finishes its last clip
        transition(s, "clip", busy, "keyframing", "keyframed")
    r2 = _batch_tick(instance, db, r1.cursor, now=emb.hold_while_in_flight_s / 2 + 1, stage=emb)
    assert len(r2.run_requests) == 1 and sorted(_requested_ids(r2, instance, emb)) == sorted([*early, busy])
    # Keyframes busy for longer than the hold does not hold embedding for longer than that.
    (late,) = make_clips(db, vid, [(72, 96)], state="keyframed")
    make_clips(db, vid, [(96, 120)], state="review_approved")
    with db.session() as s:
        for cid in (*early, busy):
            transition(s, "clip", cid, "keyframed", "embedding")
            transition(s, "clip", cid, "embedding", "embedded")
    r3 = _batch_tick(instance, db, r2.cursor, now=100.0, stage=emb)
    r4 = _batch_tick(instance, db, r3.cursor, now=100.0 + emb.hold_while_in_flight_s, stage=emb)
    assert not r3.run_requests and _requested_ids(r4, instance, emb) == [late]


def test_a_range_reaches_over_clips_still_upstream_so_a_waiting_run_takes_them(db, instance, monkeypatch, defs):
    """Two approved clips while a sprite run still works on the rest: the keyframes range reaches
    on over the clips still upstream of keyframes (not over a skipped one, a clip another run
    works on, or past max_gap), so when the run starts it claims every clip approved by then."""
    monkeypatch.delenv("HEATERS_BATCH_WAIT_S", raising=False)
    keyframes = get_stage("keyframes")
    vid = make_video(db)
    states = ["review_approved", "review_approved", "generating_sprite", "spliced", "pending_review",
              "review_skipped", "pending_review"]
    ids = [make_clips(db, vid, [(i * 24, i * 24 + 24)], state=st)[0] for i, st in enumerate(states)]
    instance.add_dynamic_partitions("clips", [str(i) for i in ids[:6]])  # the last is not registered yet
    r = _batch_tick(instance, db, None, now=0.0, stage=keyframes)
    (req,) = r.run_requests
    assert _partitions(req) == [str(ids[0]), str(ids[4])] and req.tags["heaters/items"] == "2"

    monkeypatch.setenv("HEATERS_RANGE_REACH", "0")
    (plain,) = _batch_tick(instance, db, None, now=0.0, stage=keyframes).run_requests
    assert _partitions(plain) == [str(ids[0]), str(ids[1])]
    monkeypatch.delenv("HEATERS_RANGE_REACH")
    (short,) = _batch_tick(instance, db, None, now=0.0, stage=dataclasses.replace(keyframes, max_gap=2)).run_requests
    assert _partitions(short) == [str(ids[0]), str(ids[3])]
    def set_state(cid, st):  # a state no transition leads to from here: written directly
        with db.session() as s:
            s.execute(text("UPDATE clips SET state = :st WHERE id = :id"), {"st": st, "id": cid})

    set_state(ids[3], "keyframing")  # another run is keyframing clip 3: no range reaches over its work
    (walled,) = _batch_tick(instance, db, None, now=0.0, stage=keyframes).run_requests
    assert _partitions(walled) == [str(ids[0]), str(ids[2])]
    set_state(ids[3], "spliced")

    # The run waits for the ffmpeg pool; meanwhile sprite finishes and the reviewer approves.
    with db.session() as s:
        transition(s, "clip", ids[3], "spliced", "generating_sprite")
        for cid in ids[2:5]:
            if cid != ids[4]:
                transition(s, "clip", cid, "generating_sprite", "pending_review")
            transition(s, "clip", cid, "pending_review", "review_approved")
    work, others = defs.resources["executor"].stage_work(keyframes, [int(k) for k in _range_keys(req, instance)])
    assert work == ids[:5] and others == []  # what the asset hands the executor to claim when the run starts


def test_reach_ranges_reach_back_and_on_within_the_budget_walls_and_each_others_ranges():
    from heaters_dagster.sensors.factory import reach_ranges

    keys = [str(i) for i in range(1, 11)]
    chunks = [["3", "4"], ["8"]]
    upstream = {"1", "2", "5", "6", "7", "9"}
    assert reach_ranges(keys, chunks, upstream, 100) == [("1", "7"), ("8", "9")]
    assert reach_ranges(keys, chunks, upstream, 100, barriers=["2"]) == [("3", "7"), ("8", "9")]
    assert reach_ranges(keys, chunks, upstream, 3) == [("1", "5"), ("6", "9")]  # back first, then on
    assert reach_ranges(keys, chunks, set(), 100) == [("3", "4"), ("8", "8")]
    # a later chunk never reaches back into an earlier chunk's range
    assert reach_ranges(keys, [["3"], ["6"]], {"4", "5"}, 100) == [("3", "5"), ("6", "6")]


def test_a_range_reaches_back_over_clips_an_upstream_run_is_still_finishing(db, instance, monkeypatch, defs):
    """The sprite run finishes clips out of order: the first approved clips come after one it is
    still rendering. The keyframes range starts back at that clip (not over another run's work), so
    when the run starts it claims it too instead of leaving it to a run of its own."""
    monkeypatch.delenv("HEATERS_BATCH_WAIT_S", raising=False)
    keyframes = get_stage("keyframes")
    vid = make_video(db)
    states = ["generating_sprite", "review_skipped", "pending_review", "review_approved", "review_approved",
              "spliced"]
    ids = [make_clips(db, vid, [(i * 24, i * 24 + 24)], state=st)[0] for i, st in enumerate(states)]
    instance.add_dynamic_partitions("clips", [str(i) for i in ids])
    (req,) = _batch_tick(instance, db, None, now=0.0, stage=keyframes).run_requests
    assert _partitions(req) == [str(ids[0]), str(ids[5])] and req.tags["heaters/items"] == "2"
    (short,) = _batch_tick(instance, db, None, now=0.0, stage=dataclasses.replace(keyframes, max_gap=2)).run_requests
    assert _partitions(short) == [str(ids[2]), str(ids[5])]
    with db.session() as s:  # another run is keyframing clip 1: no range reaches back over its work
        s.execute(text("UPDATE clips SET state = 'keyframing' WHERE id = :id"), {"id": ids[1]})
    (walled,) = _batch_tick(instance, db, None, now=0.0, stage=keyframes).run_requests
    assert _partitions(walled) == [str(ids[2]), str(ids[5])]
    monkeypatch.setenv("HEATERS_RANGE_REACH", "0")
    (plain,) = _batch_tick(instance, db, None, now=0.0, stage=keyframes).run_requests
    assert _partitions(plain) == [str(ids[3]), str(ids[4])]


def test_ready_clips_in_the_range_of_a_working_run_are_left_to_it(db, instance, monkeypatch):
    """A keyframes run is working on a range when another clip of that range is approved: the
    sensor does not request a run of its own for it (the working run takes it when its work is
    done); once that run has ended, the clip is requested at the next tick if it is still ready."""
    from dagster._core.test_utils import create_run_for_test

    from heaters_dagster.assets.factory import job_name

    monkeypatch.delenv("HEATERS_BATCH_WAIT_S", raising=False)
    keyframes = get_stage("keyframes")
    vid = make_video(db)
    a, b, c, outside = [make_clips(db, vid, [(i * 24, i * 24 + 24)], state="review_approved")[0] for i in range(4)]
    instance.add_dynamic_partitions("clips", [str(i) for i in (a, b, c, outside)])
    with db.session() as s:  # the run claimed a; c is in its range, now approved
        transition(s, "clip", a, "review_approved", "keyframing")
    working = create_run_for_test(instance, job_name=job_name(keyframes), status=dg.DagsterRunStatus.STARTED,
                                  tags={ASSET_PARTITION_RANGE_START_TAG: str(a), ASSET_PARTITION_RANGE_END_TAG: str(c),
                                        "heaters/requested_by": "sensor"})
    r = _batch_tick(instance, db, None, now=0.0, stage=keyframes)
    assert _requested_ids(r, instance, keyframes) == [outside]
    r2 = _batch_tick(instance, db, r.cursor, now=1.0, stage=keyframes)
    assert not r2.run_requests and "left to the keyframes run" in r2.skip_reason.skip_message
    # A person's run does not take what becomes ready in its range: no holding for it.
    instance.report_run_canceled(working)
    person = create_run_for_test(instance, job_name=job_name(keyframes), status=dg.DagsterRunStatus.STARTED,
                                 tags={ASSET_PARTITION_RANGE_START_TAG: str(a), ASSET_PARTITION_RANGE_END_TAG: str(c)})
    r3 = _batch_tick(instance, db, r2.cursor, now=2.0, stage=keyframes)
    assert sorted(_requested_ids(r3, instance, keyframes)) == [b, c]
    # A sensor's run still starting holds them too (it claims what is ready when it starts).
    (late,) = make_clips(db, vid, [(96, 120)], state="review_approved")
    instance.add_dynamic_partitions("clips", [str(late)])
    create_run_for_test(instance, job_name=job_name(keyframes), status=dg.DagsterRunStatus.STARTING,
                        tags={ASSET_PARTITION_RANGE_START_TAG: str(c), ASSET_PARTITION_RANGE_END_TAG: str(late),
                              "heaters/requested_by": "sensor"})
    r4 = _batch_tick(instance, db, r3.cursor, now=3.0, stage=keyframes)
    assert not r4.run_requests and "left to the keyframes run" in r4.skip_reason.skip_message
