"""``heaters``: submit videos, inspect state, run the demo, migrate, and start Dagster.

Every command reads the one configuration (:mod:`heaters_dagster.settings`: the environment over
``heaters.toml``). Expected failures (a bad setting, a missing clip, model weights that are not
there, an unreachable database) end the command with one ``Error: ...`` line that says what to do,
not a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import click


def _db_ready() -> None:
    """Bring up the configured (or embedded) database and apply migrations."""
    from heaters_dagster.database.engine import database_url
    from heaters_dagster.database.migrate import upgrade

    upgrade(database_url())


def _dagster_db_ready() -> None:
    """Create Dagster's own tables where missing (``ensure_dagster_storage``), before any Dagster
    process starts. For the commands that run Dagster (dev, demo, db upgrade)."""
    from heaters_dagster.database.migrate import ensure_dagster_storage

    ensure_dagster_storage()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


class HeatersGroup(click.Group):
    """Turns Heaters' own errors into one-line messages (exit status 1)."""

    def invoke(self, ctx: click.Context) -> object:
        from sqlalchemy.exc import OperationalError

        from heaters_dagster.errors import HeatersError

        try:
            return super().invoke(ctx)
        except HeatersError as exc:
            raise click.ClickException(_one_line(str(exc))) from exc
        except OperationalError as exc:
            first = _one_line(str(exc.orig).splitlines()[0] if exc.orig else str(exc))
            raise click.ClickException(
                f"cannot reach the database: {first}; check HEATERS_DATABASE_URL (or database_url in "
                "heaters.toml), or unset it to use the embedded server") from exc


@click.group(cls=HeatersGroup)
@click.version_option(package_name="heaters-dagster")
def cli() -> None:
    """Heaters: video-clip curation on Dagster.

    Settings come from HEATERS_* environment variables over a heaters.toml project file (see
    `heaters config`)."""
    from heaters_dagster.settings import load

    load()  # a bad setting fails here, in one line, before any command starts work


# -- configuration -----------------------------------------------------------------------------
@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--table", is_flag=True, help="Print the README's Configuration table (generated from the model).")
def config_cmd(as_json: bool, table: bool) -> None:
    """Show every setting in force and where it comes from (environment, heaters.toml, default).

    heaters.toml is the first of: $HEATERS_CONFIG, $HEATERS_HOME/heaters.toml (./.heaters/heaters.toml
    without HEATERS_HOME), ./heaters.toml, the project root's heaters.toml. The environment overrides it."""
    from heaters_dagster.settings import describe_settings, load, readme_table

    if table:
        click.echo(readme_table())
        return
    rows = describe_settings()
    file = load().file
    if as_json:
        click.echo(json.dumps({"file": str(file) if file else None, "settings": rows}, indent=2, default=str))
        return
    click.echo(f"config file: {file or 'none'}")
    for r in rows:
        value = "-" if r["value"] is None else r["value"]
        click.echo(f"{r['variable']:<30} {str(value):<40} {r['source']}")


# -- database ----------------------------------------------------------------------------------
@cli.group()
def db() -> None:
    """Database commands."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply Alembic migrations and create Dagster's tables where missing (starts the embedded
    Postgres when no URL is configured)."""
    _db_ready()
    _dagster_db_ready()
    click.echo("database is at the latest migration")


@db.command("url")
def db_url() -> None:
    """Print the database URL in use."""
    from heaters_dagster.database.engine import database_url

    click.echo(database_url())


# -- submit / status / requeue -----------------------------------------------------------------
@cli.command()
@click.argument("source")
@click.option("--title", "-t", default=None, help="A title for the video (defaults to the file name).")
def submit(source: str, title: str | None) -> None:
    """Record SOURCE (an http(s) URL or a local file) as a new source video."""
    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.pipeline.submit import submit_source
    from heaters_dagster.settings import storage_url
    from heaters_dagster.storage import ArtifactStore

    _db_ready()
    with session_scope() as session:
        sub = submit_source(session, ArtifactStore(storage_url()), source, title)
    if sub.error:
        click.echo(f"video {sub.video_id}: {sub.state}: {sub.error}", err=True)
        sys.exit(1)
    click.echo(f"video {sub.video_id}: {sub.state}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Counts per state, and every failed item with its message."""
    from heaters_dagster.status import collect_status

    _db_ready()
    st = collect_status()
    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    for kind in ("videos", "clips"):
        counts = st[kind]
        total = sum(counts.values())
        click.echo(f"{kind}: {total}" + ("" if not counts else "  (" + ", ".join(
            f"{k} {v}" for k, v in sorted(counts.items())) + ")"))
    if st["failures"]:
        click.echo("failures:")
        for f in st["failures"]:
            click.echo(f"  {f['kind']} {f['id']} [{f['state']}, tries {f['retry_count']}]: {f['last_error']}")
    if st["in_progress"]:
        click.echo("in progress:")
        for h in st["in_progress"]:
            age = f"{h['age_s']:.0f}s" if h["age_s"] is not None else "?"
            lease = ("EXPIRED (the recovery sensor returns it; or `heaters requeue " + h["stage"] + f" {h['id']}`)"
                     if h["expired"] else f"lease {h['lease_left_s']:.0f}s left")
            lost = f", lost {h['lost_count']}x before" if h["lost_count"] else ""
            click.echo(f"  {h['kind']} {h['id']} [{h['state']}] for {age}, owner {h['owner'] or '-'}, {lease}{lost}")
    if st["errors_by_stage"]:
        click.echo("errors by stage (stage_results):")
        for e in st["errors_by_stage"]:
            click.echo(f"  {e['stage']}: {e['status']} {e['error_type']} x{e['count']}")


@cli.command()
@click.option("--fix", is_flag=True, help="Repair what can be repaired (see heaters_dagster/doctor/).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--orphan-grace", type=float, default=None,
              help="Seconds before an unreferenced store file or temp file counts "
              "(HEATERS_ORPHAN_GRACE_S, 3600).")
@click.option("--scratch-grace", type=float, default=None,
              help="Seconds a scratch folder must be untouched to be stale (HEATERS_SCRATCH_GRACE_S, 21600).")
@click.option("--scratch-dir", "scratch_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Where stage scratch folders live (repeatable; default: the system temp folder).")
def doctor(fix: bool, as_json: bool, orphan_grace: float | None, scratch_grace: float | None,
           scratch_dirs: tuple[str, ...]) -> None:
    """Find expired claims, store files without rows, rows without files, temp files, stale scratch
    folders and dead embedded-Postgres holders; --fix repairs them. Exit 1 if problems remain."""
    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.doctor import diagnose, repair
    from heaters_dagster.settings import storage_url
    from heaters_dagster.storage import ArtifactStore

    _db_ready()
    store = ArtifactStore(storage_url())
    with session_scope() as s:
        report = diagnose(s, store, orphan_grace=orphan_grace, scratch_grace=scratch_grace,
                          scratch_dirs=list(scratch_dirs) or None)
    if fix and report.findings:
        with session_scope() as s:
            repair(report, s, store)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for f in report.findings:
            click.echo(f.line())
        for note in report.skipped:
            click.echo(f"skipped: {note}")
        click.echo(f"doctor: {report.summary()}")
    sys.exit(1 if report.unresolved else 0)


@cli.command()
@click.argument("stage_name")
@click.argument("ids", nargs=-1, type=int, required=True)
@click.option("--force", is_flag=True, help="Also take back items whose claim is still live (the worker is "
              "presumed dead or stuck; its late result can no longer commit).")
def requeue(stage_name: str, ids: tuple[int, ...], force: bool) -> None:
    """Send items back to STAGE_NAME's input state so its sensor runs them again: items in the
    stage's failure state, or stuck in its in-progress state with an expired claim (or any claim with
    --force)."""
    from sqlalchemy import text

    from heaters_dagster import leases
    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.errors import HeatersError
    from heaters_dagster.stages import get_stage
    from heaters_dagster.state_machine import transition

    try:
        stage = get_stage(stage_name)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="STAGE_NAME") from None
    _db_ready()
    failed = 0
    for item_id in ids:
        try:
            with session_scope() as s:
                row = s.execute(text(f"SELECT state, claim_expires_at IS NULL OR claim_expires_at <= now() AS expired, "
                                     f"claim_owner FROM {leases.TABLES[stage.entity]} WHERE id = :id"),
                                {"id": item_id}).first()
                if row is not None and row.state == stage.in_progress_state:
                    if not (row.expired or force):
                        raise HeatersError(f"is {row.state}, held by {row.claim_owner} with a live lease; "
                                           "wait for it to expire or use --force")
                    leases.release_items(s, stage.entity, [item_id], counts_as_lost=False,
                                         reason=f"requeued by an operator (was held by {row.claim_owner})")
                    click.echo(f"{stage.entity} {item_id}: {stage.in_progress_state} -> {stage.retry_state}")
                    continue
                transition(s, stage.entity, item_id, stage.failure_state, stage.retry_state, clear_error=True,
                           bump_version=True, values={"lost_count": 0})
            click.echo(f"{stage.entity} {item_id}: {stage.failure_state} -> {stage.retry_state}")
        except HeatersError as exc:
            failed += 1
            prefix = f"{stage.entity} {item_id}"
            click.echo(str(exc) if str(exc).startswith(prefix) else f"{prefix}: {exc}", err=True)
    sys.exit(1 if failed else 0)


# -- search / review ---------------------------------------------------------------------------
@cli.command()
@click.option("--clip", "clip_id", type=int, default=None, help="Find clips that look like this clip.")
@click.option("--text", "query", default=None, help="Find clips that match this phrase (CLIP text tower).")
@click.option("-k", "k", type=int, default=10, show_default=True, help="How many results.")
@click.option("--source", "source_video_id", type=int, default=None, help="Only clips of this source video.")
@click.option("--state", "states", multiple=True, help="Only clips in these states (default: embedded).")
@click.option("--exclude-self", is_flag=True, help="With --clip: leave the query clip out.")
@click.option("--strategy", default=None, help="Embedding strategy (default: the embedding stage's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def search(clip_id: int | None, query: str | None, k: int, source_video_id: int | None, states: tuple[str, ...],
           exclude_self: bool, strategy: str | None, as_json: bool) -> None:
    """Nearest clips to a clip (--clip ID) or to a phrase (--text "a red car").

    The embedding stage's configured model is searched; when it has no stored embeddings, the model
    of the stored embeddings is, and the first line (JSON: model_id, model_source) says so."""
    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.pipeline.handlers import embedding_spec
    from heaters_dagster.search import DEFAULT_STATES, choose_model, search_by_clip, search_by_text, spec_for_model
    from heaters_dagster.settings import storage_url
    from heaters_dagster.stages import get_stage
    from heaters_dagster.storage import ArtifactStore

    if (clip_id is None) == (query is None):
        raise click.UsageError("give exactly one of --clip ID or --text PHRASE")
    _db_ready()
    params = get_stage("embedding").params
    spec = embedding_spec(params)
    strategy = strategy or params["strategy"]
    kw = {"k": k, "source_video_id": source_video_id, "states": list(states) or list(DEFAULT_STATES)}
    with session_scope() as s:
        model = choose_model(s, spec.model_id, strategy, clip_id=clip_id)
        if clip_id is not None:
            hits = search_by_clip(s, clip_id, model_id=model.model_id, strategy=strategy,
                                  exclude_clip_id=clip_id if exclude_self else None, **kw)
        else:
            from heaters_dagster.media.embedding import ClipEmbedder

            embedder = ClipEmbedder.load(spec_for_model(model.model_id, spec))
            hits = search_by_text(s, embedder, query or "", strategy=strategy, **kw)
    store = ArtifactStore(storage_url())
    rows = [{**h.to_dict(), "file_uri": store.uri(h.file_key)} for h in hits]
    if as_json:
        click.echo(json.dumps({**model.to_dict(), "results": rows}, indent=2))
        return
    click.echo(model.describe())
    if not rows:
        click.echo("no results")
    for r in rows:
        click.echo(f"clip {r['clip_id']:>6}  {100 * r['similarity']:6.2f}%  video {r['source_video_id']}  "
                   f"{r['start_s']:8.2f}-{r['end_s']:8.2f}s  {r['file_uri']}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--token", default=None,
              help="Reviewer token required for every write (default: HEATERS_REVIEW_TOKEN, or review_token in "
              "heaters.toml). Without it the page is read-only.")
@click.option("--apply-events/--no-apply-events", default=False, show_default=True,
              help="Apply review events from the page itself (when the Dagster daemon is not running).")
def review(host: str, port: int, token: str | None, apply_events: bool) -> None:
    """Serve the review page for human reviewers."""
    from heaters_dagster.database.embedded import stop_embedded
    from heaters_dagster.review.app import serve
    from heaters_dagster.settings import get_settings

    token = token or get_settings().review_token

    # uvicorn shuts down on SIGTERM/SIGINT and then re-raises the signal with the handler it found:
    # with SIGTERM's default that would kill the process before the embedded server is stopped, so
    # exit through SystemExit instead. SIGHUP (terminal closed) becomes a SIGTERM for uvicorn.
    _exit_on_signals(signal.SIGTERM)
    signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        _db_ready()
        if not token:
            click.echo("warning: no reviewer token configured; the page is read-only (set HEATERS_REVIEW_TOKEN, "
                       "review_token in heaters.toml, or --token)", err=True)
        serve(host=host, port=port, token=token, apply_events=apply_events)
    finally:
        stop_embedded()


# -- demo / dev --------------------------------------------------------------------------------
@cli.command()
@click.option("--scenes", default="3.0,2.5,4.0,0.6,3.0", show_default=True,
              help="Scene lengths in seconds of the generated sample (scenes under 1 s are dropped).")
def demo(scenes: str) -> None:
    """Make a sample video with known cuts, submit it and run every stage in process."""
    import dagster as dg

    from heaters_dagster.dagster_home import prepare_dagster_home
    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.definitions import defs
    from heaters_dagster.inprocess import PipelineDriver
    from heaters_dagster.media.synthetic import make_video
    from heaters_dagster.pipeline.submit import submit_source
    from heaters_dagster.settings import heaters_home, storage_url
    from heaters_dagster.status import clip_summary
    from heaters_dagster.storage import ArtifactStore

    _db_ready()
    lengths = [float(s) for s in scenes.split(",") if s.strip()]
    sample = heaters_home() / "demo" / "sample.mp4"
    video = make_video(sample, lengths, fps=24, width=640, height=360, flash_frames=(30,))
    click.echo(f"sample: {sample} ({video.frame_count} frames, cuts at {list(video.cut_frames)})")
    store = ArtifactStore(storage_url())
    with session_scope() as session:
        sub = submit_source(session, store, str(sample), "Heaters demo")
    click.echo(f"submitted video {sub.video_id}")
    _dagster_db_ready()
    prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        driver = PipelineDriver(defs, instance, log=click.echo)
        driver.run_until_idle()
    clips = clip_summary(sub.video_id)
    click.echo(f"video {sub.video_id}: {len(clips)} clips")
    for c in clips:
        sprite = c["sprite_uri"] or "-"
        click.echo(f"  clip {c['id']}: frames [{c['start_frame']}, {c['end_frame']}) {c['state']}  sprite {sprite}")
    missing = [c["id"] for c in clips if c["state"] == "pending_review" and not c["sprite_exists"]]
    if not clips or missing or any(c["state"] != "pending_review" for c in clips):
        click.echo("demo did not end with every clip in pending_review with its sprite", err=True)
        sys.exit(1)
    click.echo("demo finished: every clip is pending_review with its sprite sheet")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def dev(ctx: click.Context) -> None:
    """Start the platform: database up, migrations applied, then `dagster dev` with this project's
    workspace.yaml and dagster.yaml. Extra arguments go to `dagster dev` (e.g. -p 3000)."""
    from heaters_dagster.dagster_home import prepare_dagster_home, project_root
    from heaters_dagster.database.embedded import ensure_environment, stop_embedded
    from heaters_dagster.lifecycle import (DevAlreadyRunning, DevSupervisor, acquire_dev_lock, fail_interrupted_runs,
                                           recover_previous_dev)
    from heaters_dagster.database.engine import database_url
    from heaters_dagster.settings import export_for_children, heaters_home, redact_url

    # Until the supervisor takes over, a SIGTERM/SIGHUP exits through atexit (which stops the
    # embedded server) instead of killing the process outright.
    _exit_on_signals(signal.SIGTERM, signal.SIGHUP)
    # The code location and the daemon read the same heaters.toml and home as this process.
    export_for_children()
    hhome = heaters_home()
    try:
        acquire_dev_lock(hhome)
    except DevAlreadyRunning as exc:
        raise click.ClickException(str(exc)) from exc
    def say(message: str) -> None:
        click.echo(f"heaters dev: {message}", err=True)

    recover_previous_dev(hhome, echo=say)
    ensure_environment()
    _db_ready()
    _dagster_db_ready()
    home = prepare_dagster_home()
    fail_interrupted_runs(echo=say)
    root = project_root()
    click.echo(f"DAGSTER_HOME={home}\nHEATERS_DATABASE_URL={redact_url(database_url())}\n"
               f"HEATERS_CONFIG={os.environ.get('HEATERS_CONFIG') or 'none (no heaters.toml found)'}")
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [str(dagster if dagster.exists() else "dagster"), "dev", "-w", str(root / "workspace.yaml"), *ctx.args]
    # SIGTERM/SIGINT/SIGHUP: dagster dev shuts down gracefully, anything of its tree still alive after
    # 18 s is killed, then the embedded server stops (see heaters_dagster/lifecycle.py).
    supervisor = DevSupervisor(cmd, cwd=root, home=hhome, grace_s=18.0, echo=say)
    try:
        code = supervisor.run()
    finally:
        stop_embedded()
    sys.exit(code)


from heaters_dagster.cli.bench import bench_cmd  # noqa: E402

cli.add_command(bench_cmd)


def _exit_on_signals(*signums: int) -> None:
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for signum in signums:
        signal.signal(signum, handler)


from heaters_dagster.cli.worker import worker  # noqa: E402 - its own module (README "Scaling out")

cli.add_command(worker)


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
