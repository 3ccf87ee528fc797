"""Where stage steps run: this host's processes, or Celery workers (``HEATERS_EXECUTOR=celery``).

With ``celery`` every stage job uses dagster-celery's ``celery_executor``: the run worker that the
daemon launches hands each step to the broker (``HEATERS_CELERY_BROKER_URL``) and any ``heaters
worker`` process runs it, against the same database, artifact store and Dagster instance. Both
sides build their Celery app here from the same settings, so the executor and the workers always
agree on the broker, the result backend and the queue. Switching is configuration only.
"""

from __future__ import annotations

from typing import Any

from heaters_dagster.settings import Settings, get_settings

QUEUE = "dagster"  # dagster-celery's default queue; `heaters worker -q` and the dagster/celery_queue tag pick others

# Celery settings both sides share. One task at a time per prefetch (a media step is long), and a
# short broker retry so a broker outage fails a step rather than hanging it.
CELERY_CONFIG: dict[str, Any] = {
    "worker_prefetch_multiplier": 1,
    "broker_connection_retry_on_startup": True,
    "result_expires": 86400,
}


def executor_config(settings: Settings | None = None) -> dict[str, Any]:
    """The ``celery_executor`` config for the settings in force."""
    s = settings or get_settings()
    return {"broker": s.celery_broker_url, "backend": s.celery_backend, "config_source": dict(CELERY_CONFIG)}


def stage_executor_def(settings: Settings | None = None) -> Any:
    """The executor of the stage jobs: ``None`` (Dagster's default, multiprocess on this host) or
    ``celery_executor`` configured from the settings."""
    s = settings or get_settings()
    if s.executor != "celery":
        return None
    from dagster_celery import celery_executor

    return celery_executor.configured(executor_config(s), name="heaters_celery")


def celery_app(settings: Settings | None = None) -> Any:
    """The Celery app of ``heaters worker``: dagster-celery's tasks on the broker and backend of
    the settings (the same values :func:`executor_config` gives the stage jobs)."""
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

    cfg = executor_config(settings)
    app = make_app(CeleryExecutor.for_cli(broker=cfg["broker"], backend=cfg["backend"],
                                          config_source=cfg["config_source"]).app_args())
    create_task(app)
    create_execute_job_task(app)
    create_resume_job_task(app)
    return app
