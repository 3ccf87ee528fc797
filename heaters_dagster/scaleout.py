"""Where stage steps run: this host's processes, Celery workers (``HEATERS_EXECUTOR=celery``) or
Kubernetes pods (``HEATERS_EXECUTOR=k8s``, dagster-k8s's ``k8s_job_executor``; ``deploy/k8s/``).

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


# Kubernetes resources of each stage's step pod (``HEATERS_EXECUTOR=k8s``), sized from the measured
# peaks in bench/results/ (bench/results/celery_scale.md, "Sizing"): 1080p splice is detection
# (Python 59 MiB + ffmpeg 87 MiB) then up to HEATERS_MAX_FFMPEG=2 x264 cuts at 311 MiB each;
# ingest's normalise is one x264 encode of the same size; embedding holds ViT-B-32 and torch
# (2.1 GiB measured on a Celery worker with int8 quantisation; bench/results/celery_scale.json).
STEP_RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "ingest": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "splice": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "sprite": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
    "keyframes": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
    "embedding": {"requests": {"cpu": "2", "memory": "2560Mi"}, "limits": {"memory": "3Gi"}},
    "split": {"requests": {"cpu": "1", "memory": "768Mi"}, "limits": {"memory": "1536Mi"}},
    "merge": {"requests": {"cpu": "1", "memory": "768Mi"}, "limits": {"memory": "1536Mi"}},
    "archive": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
}


def step_resources() -> dict[str, dict[str, dict[str, str]]]:
    """Requests and limits per step key. A step is a stage's op, whose key is the stage's name, or
    the op of a stage and the stages that run after it (``Stage.runs_after``; splice in ingest's
    step), keyed by the first, with the largest memory limit of them."""
    from kubernetes.utils import parse_quantity  # with dagster-k8s, which this config is for

    from heaters_dagster.stages import stage_groups

    return {group[0].name: max((STEP_RESOURCES[st.name] for st in group),
                               key=lambda r: parse_quantity(r["limits"]["memory"]))
            for group in stage_groups()}


def k8s_executor_config(settings: Settings | None = None) -> dict[str, Any]:
    """The ``k8s_job_executor`` config: the settings' Secret on every step pod, and each step
    (:func:`step_resources`) with its own requests and limits."""
    s = settings or get_settings()
    return {"env_secrets": [s.k8s_env_secret],
            "per_step_k8s_config": {name: {"container_config": {"resources": res}}
                                    for name, res in step_resources().items()}}


def stage_executor_def(settings: Settings | None = None) -> Any:
    """The executor of the stage jobs: ``None`` (Dagster's default, multiprocess on this host),
    ``celery_executor`` or ``k8s_job_executor``, configured from the settings."""
    s = settings or get_settings()
    if s.executor == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(executor_config(s), name="heaters_celery")
    if s.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(k8s_executor_config(s), name="heaters_k8s")
    return None


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
