"""``heaters worker``: a Celery worker that runs stage steps (``HEATERS_EXECUTOR=celery``).

It reads the one configuration like every other Heaters process: the broker and result backend
(``HEATERS_CELERY_BROKER_URL`` / ``HEATERS_CELERY_BACKEND_URL``) the stage jobs send their steps
to, and the database and artifact store (``HEATERS_DATABASE_URL``, ``HEATERS_STORAGE_URL``,
``HEATERS_STORAGE_ENDPOINT_URL``) the steps work on. Without a database URL it attaches to the
embedded server of this ``HEATERS_HOME`` (one host); a worker on another machine needs a real
PostgreSQL and an S3-compatible store (README: "Scaling out").
"""

from __future__ import annotations

import os
import socket

import click


def worker_argv(concurrency: int, name: str | None, queues: tuple[str, ...], loglevel: str,
                max_tasks_per_child: int | None) -> list[str]:
    from heaters_dagster.scaleout import QUEUE

    argv = ["worker", f"--concurrency={concurrency}", "--prefetch-multiplier=1", f"--loglevel={loglevel}",
            "-Q", ",".join(queues or (QUEUE,)), "-n", name or f"heaters-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip", "--without-mingle"]
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    return argv


@click.command("worker")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=1, show_default=True,
              help="Steps this worker runs at once (one process each). Media steps use up to "
                   "HEATERS_MAX_FFMPEG ffmpeg processes each.")
@click.option("--name", "-n", default=None, help="Celery node name (default heaters-<pid>@<host>).")
@click.option("--queue", "-q", "queues", multiple=True,
              help="Queues to listen on (default: dagster; a step's dagster-celery/queue tag picks one).")
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Celery log level.")
@click.option("--max-tasks-per-child", type=int, default=None,
              help="Replace a worker process after this many steps (bounds memory growth).")
def worker(concurrency: int, name: str | None, queues: tuple[str, ...], loglevel: str,
           max_tasks_per_child: int | None) -> None:
    """Run stage steps handed out over Celery (HEATERS_EXECUTOR=celery; README "Scaling out")."""
    from heaters_dagster.database.embedded import ensure_environment
    from heaters_dagster.scaleout import celery_app
    from heaters_dagster.settings import export_for_children, get_settings, redact_url

    export_for_children()
    ensure_environment()  # the database the steps use (the embedded server of this home if none is set)
    settings = get_settings()
    click.echo(f"heaters worker: broker {redact_url(settings.celery_broker_url)}, store {settings.store_url}",
               err=True)
    app = celery_app(settings)
    app.worker_main(worker_argv(concurrency, name, queues, loglevel, max_tasks_per_child))
