"""The Kubernetes path, checked offline (no cluster, no helm binary here): the Helm values parse and
match the shape of the Dagster chart's values for the parts they set (a JSON schema of those parts,
unknown keys refused where the chart refuses them), every secret comes from the one Secret the
settings name, the step executor's config is valid for dagster-k8s's ``k8s_job_executor``, and the
memory limits hold the peaks measured in ``bench/results``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from heaters_dagster.scaleout import STEP_RESOURCES, k8s_executor_config, stage_executor_def
from heaters_dagster.settings import Settings
from heaters_dagster.stages import STAGES_BY_NAME

ROOT = Path(__file__).resolve().parents[1]
VALUES = ROOT / "deploy" / "k8s" / "values.yaml"
RESULTS = ROOT / "bench" / "results"

_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti)?$"}
_RESOURCES = {
    "type": "object", "additionalProperties": False,
    "properties": {k: {"type": "object", "additionalProperties": False,
                       "properties": {"cpu": _QUANTITY, "memory": _QUANTITY}} for k in ("requests", "limits")},
    "required": ["requests", "limits"],
}
_SECRETS = {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name"],
                                                      "additionalProperties": False,
                                                      "properties": {"name": {"type": "string"}}}}
_ENV_LIST = {"type": "array", "items": {"type": "object", "required": ["name", "value"],
                                        "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}}
# The parts of the chart's values schema (helm/dagster/schema in dagster-io/dagster) these values set.
SCHEMA = {
    "type": "object",
    "required": ["postgresql", "dagsterDaemon", "dagster-user-deployments", "runLauncher"],
    "properties": {
        "global": {"type": "object", "properties": {"postgresqlSecretName": {"type": "string"}}},
        "generatePostgresqlPasswordSecret": {"type": "boolean"},
        "postgresql": {"type": "object", "required": ["enabled", "postgresqlHost"],
                       "properties": {"enabled": {"const": False}, "postgresqlHost": {"type": "string", "minLength": 1},
                                      "postgresqlUsername": {"type": "string"},
                                      "postgresqlDatabase": {"type": "string"}}},
        "dagsterWebserver": {"type": "object", "properties": {"resources": _RESOURCES,
                                                              "replicaCount": {"type": "integer"}}},
        "dagsterDaemon": {"type": "object", "properties": {
            "envSecrets": _SECRETS, "resources": _RESOURCES,
            "runCoordinator": {"type": "object", "required": ["type"], "properties": {
                "type": {"const": "QueuedRunCoordinator"},
                "config": {"type": "object", "properties": {"queuedRunCoordinator": {
                    "type": "object", "properties": {"maxConcurrentRuns": {"type": "integer", "minimum": 1}}}}}}}}},
        "dagster-user-deployments": {"type": "object", "required": ["enabled", "deployments"], "properties": {
            "enabled": {"const": True},
            "deployments": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "image", "dagsterApiGrpcArgs", "port"],
                "properties": {
                    "name": {"type": "string"}, "port": {"type": "integer"},
                    "image": {"type": "object", "required": ["repository", "tag", "pullPolicy"],
                              "properties": {"tag": {"type": "string"},
                                             "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}},
                    "dagsterApiGrpcArgs": {"type": "array", "items": {"type": "string"}},
                    "env": _ENV_LIST, "envSecrets": _SECRETS, "resources": _RESOURCES,
                    "includeConfigInLaunchedRuns": {"type": "object", "properties": {"enabled": {"type": "boolean"}}},
                }}}}},
        "runLauncher": {"type": "object", "required": ["type", "config"], "additionalProperties": False,
                        "properties": {"type": {"const": "K8sRunLauncher"},
                                       "config": {"type": "object", "additionalProperties": False,
                                                  "required": ["k8sRunLauncher"], "properties": {"k8sRunLauncher": {
                                                      "type": "object", "additionalProperties": False,
                                                      "properties": {
                                                          "envSecrets": _SECRETS,
                                                          "runK8sConfig": {"type": "object", "additionalProperties": False,
                                                                           "properties": {"containerConfig": {
                                                                               "type": "object", "properties": {
                                                                                   "resources": _RESOURCES}}}}}}}}}},
    },
}


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def _mib(q: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti)?", q)
    assert m, q
    return float(m.group(1)) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2, None: 1 / 1024**2}[m.group(2)]


def test_values_match_the_chart_shape(values):
    jsonschema.validate(values, SCHEMA)
    (dep,) = values["dagster-user-deployments"]["deployments"]
    assert dep["dagsterApiGrpcArgs"] == ["-m", "heaters_dagster.definitions"]
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert env["HEATERS_EXECUTOR"] == "k8s"
    # an unknown run launcher key is refused, as the chart's schema refuses it
    bad = json.loads(json.dumps(values))
    bad["runLauncher"]["config"]["k8sRunLauncher"]["envSecret"] = [{"name": "x"}]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_every_secret_is_the_settings_secret_and_none_is_inline(values):
    secret = Settings().k8s_env_secret
    (dep,) = values["dagster-user-deployments"]["deployments"]
    names = {s["name"] for s in [*dep["envSecrets"], *values["dagsterDaemon"]["envSecrets"],
                                 *values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]]}
    assert names == {secret}
    assert {e["name"]: e["value"] for e in dep["env"]}["HEATERS_K8S_ENV_SECRET"] == secret
    text = VALUES.read_text().lower()
    assert "password:" not in text and "aws_secret" not in text and "postgresql://" not in text


def test_step_executor_config_is_valid_for_k8s_job_executor(monkeypatch):
    from dagster._config import process_config
    from dagster_k8s import k8s_job_executor

    cfg = k8s_executor_config(Settings())
    res = process_config(k8s_job_executor.config_schema.config_type, cfg)
    assert res.success, res.errors
    # a stage's step key is its name; splice runs in ingest's step (Stage.runs_after)
    assert set(cfg["per_step_k8s_config"]) == set(STAGES_BY_NAME) - {"splice"}
    assert cfg["per_step_k8s_config"]["ingest"]["container_config"]["resources"] == STEP_RESOURCES["splice"]
    monkeypatch.setenv("HEATERS_EXECUTOR", "k8s")
    from heaters_dagster.settings import get_settings

    assert stage_executor_def(get_settings()).name == "heaters_k8s"
    bad = process_config(k8s_job_executor.config_schema.config_type, {**cfg, "env_secret": ["x"]})
    assert not bad.success


def test_memory_limits_hold_the_measured_peaks(values):
    splice = json.loads((RESULTS / "splice_5min.json").read_text())
    detect = splice["detect_peak_rss_total_mib"]
    cut = splice["cut_clips"]["python_peak_rss_mib"] + 2 * splice["cut_clips"]["ffmpeg_peak_rss_mib"]  # 2 ffmpeg
    need = {"splice": max(detect, cut), "ingest": splice["cut_clips"]["ffmpeg_peak_rss_mib"] * 2}
    scale = RESULTS / "celery_scale.json"
    if scale.exists():
        measured = json.loads(scale.read_text()).get("memory_mib", {})
        need.update({k: v for k, v in measured.items() if k in STEP_RESOURCES})
    for stage, peak in need.items():
        res = STEP_RESOURCES[stage]
        assert _mib(res["limits"]["memory"]) >= 1.25 * peak, (stage, peak, res)
        assert _mib(res["requests"]["memory"]) <= _mib(res["limits"]["memory"])
    (dep,) = values["dagster-user-deployments"]["deployments"]
    assert _mib(dep["resources"]["requests"]["memory"]) <= _mib(dep["resources"]["limits"]["memory"])
