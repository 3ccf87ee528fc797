"""Splice runs after ingest in ingest's step (``Stage.runs_after``, HEATERS_CHAIN_STAGES): one run
takes a video from ``new`` to ``spliced``; a video ingest fails is not touched by splice in that
run; the splice sensor leaves a video to an unfinished ingest run that covers it and takes it once
that run is over; splice's own job still runs splice alone."""

from __future__ import annotations

import dagster as dg
import pytest
from sqlalchemy import text

from heaters_dagster.assets.factory import job_name
from heaters_dagster.definitions import build_definitions
from heaters_dagster.media.synthetic import make_video
from heaters_dagster.sensors.factory import evaluate_stage_sensor
from heaters_dagster.stages import get_stage
from heaters_dagster_tests.factories import make_video as make_video_row
from heaters_dagster_tests.factories import row_of
from heaters_dagster_tests.pipeline_helpers import clips_of, drive, submit

INGEST, SPLICE = get_stage("ingest"), get_stage("splice")


@pytest.fixture(scope="module")
def sample(media_dir):
    return make_video(media_dir / "chained.mp4", (1.5, 1.5, 1.5), fps=24)


def _results(db, video_id: int) -> list:
    with db.session() as s:
        return s.execute(text("SELECT stage, status, run_id FROM stage_results WHERE entity_kind = 'video' "
                              "AND entity_id = :id ORDER BY id"), {"id": video_id}).all()


def test_one_ingest_run_takes_a_video_to_spliced_and_a_failed_ingest_is_not_spliced(db, store, defs, instance,
                                                                                      sample, tmp_path):
    good = submit(db, store, sample.path, "good")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4096)  # passes submit, fails ingest's probe
    bad = submit(db, store, broken, "bad")
    runs = drive(defs, instance, stop_at={"sprite"})
    assert {r.stage for r in runs} == {"ingest"}, runs  # no splice run of its own
    assert row_of(db, "video", good.video_id).state == "spliced"
    assert len(clips_of(db, good.video_id)) == 3
    results = _results(db, good.video_id)
    assert [(r.stage, r.status) for r in results] == [("ingest", "succeeded"), ("splice", "succeeded")]
    assert results[0].run_id == results[1].run_id  # the same run
    mats = {k: instance.fetch_materializations(dg.AssetKey(k), limit=10).records for k in ("ingest", "splice")}
    assert {r.run_id for r in mats["splice"] if r.partition_key == str(good.video_id)} == {results[0].run_id}
    # The bad video failed ingest with its reason; splice never looked at it.
    video = row_of(db, "video", bad.video_id)
    assert video.state == "ingestion_failed" and video.last_error
    assert [r.stage for r in _results(db, bad.video_id)] == ["ingest"]
    assert not [r for r in mats["splice"] if r.partition_key == str(bad.video_id)]


def _splice_tick(instance, db, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"database": db}) as ctx:
        return evaluate_stage_sensor(ctx, SPLICE, db, now=0.0)


def _add_ingest_run(instance, video_id: int, status):
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
    from dagster._core.test_utils import create_run_for_test

    origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("heaters"), "__repository__"),
                             job_name(INGEST))
    return create_run_for_test(instance, job_name=job_name(INGEST), status=status, remote_job_origin=origin,
                               tags={"dagster/partition": str(video_id)})


def test_the_splice_sensor_leaves_a_video_to_the_ingest_run_that_covers_it(db, instance, monkeypatch):
    vid = make_video_row(db, state="downloaded")
    instance.add_dynamic_partitions("videos", [str(vid)])
    run = _add_ingest_run(instance, vid, dg.DagsterRunStatus.STARTED)  # between its ingest and its splice
    r = _splice_tick(instance, db)
    assert not r.run_requests
    instance.report_run_failed(instance.get_run_by_id(run.run_id))  # it died before splicing
    r2 = _splice_tick(instance, db, r.cursor)
    assert [q.partition_key for q in r2.run_requests] == [str(vid)]
    assert not _splice_tick(instance, db, r2.cursor).run_requests  # once
    # Unchained, the sensor does not look at ingest runs.
    other = make_video_row(db, state="downloaded")
    instance.add_dynamic_partitions("videos", [str(other)])
    _add_ingest_run(instance, other, dg.DagsterRunStatus.STARTED)
    monkeypatch.setenv("HEATERS_CHAIN_STAGES", "0")
    assert [q.partition_key for q in _splice_tick(instance, db, r2.cursor).run_requests] == [str(other)]


def test_unchained_ingest_stops_at_downloaded_and_splice_job_runs_splice_alone(db, store, store_dir, instance,
                                                                               sample, monkeypatch):
    monkeypatch.setenv("HEATERS_CHAIN_STAGES", "0")
    defs = build_definitions(database_url=db.url, storage_url=str(store_dir))
    sub = submit(db, store, sample.path, "unchained")
    runs = drive(defs, instance, stop_at={"splice", "sprite"})
    assert [r.stage for r in runs] == ["ingest"] and row_of(db, "video", sub.video_id).state == "downloaded"
    monkeypatch.delenv("HEATERS_CHAIN_STAGES")  # chained again: splice's own job is still splice alone
    chained = build_definitions(database_url=db.url, storage_url=str(store_dir))
    runs = drive(chained, instance, stop_at={"ingest", "sprite"})
    assert [r.stage for r in runs] == ["splice"] and all(r.success for r in runs)
    assert row_of(db, "video", sub.video_id).state == "spliced"
    assert [r.stage for r in _results(db, sub.video_id)] == ["ingest", "splice"]
