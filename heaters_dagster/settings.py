"""One configuration for every Heaters process: ``heaters dev`` and the Dagster code location it
starts, ``heaters review``, ``heaters search`` and the rest of the CLI.

:class:`Settings` (pydantic-settings) is read from, highest priority first:

1. the environment: ``HEATERS_<NAME>`` (an empty value counts as unset);
2. a project file, ``heaters.toml``: the first of ``$HEATERS_CONFIG`` (a path; ``none`` for no
   file), ``$HEATERS_HOME/heaters.toml`` (``./.heaters/heaters.toml`` without HEATERS_HOME),
   ``./heaters.toml``, and ``heaters.toml`` in the project root (the folder with workspace.yaml);
   its keys are the setting names in lower case without the prefix (``clip_pretrained = "none"``);
   relative paths in it are relative to the file's folder;
3. the defaults below.

``heaters dev`` exports the file it found (``HEATERS_CONFIG``) and the resolved ``HEATERS_HOME``
to the processes it starts, so the code location reads exactly what the CLI read. ``heaters
config`` prints the values in force and where each came from. README.md's Configuration table
is generated from this model (:func:`readme_table`; a test checks that it matches).

Values are read when asked for (:func:`get_settings` is cached on the environment and the
current folder, so a changed variable takes effect at once); a few are fixed when a process
starts (the embedding stage's parameters, the recovery sensor's interval).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from heaters_dagster.errors import ConfigError

ENV_PREFIX = "HEATERS_"
CONFIG_ENV = "HEATERS_CONFIG"
CONFIG_FILE = "heaters.toml"

DEFAULT_MAX_SOURCE_BYTES = 20 * 1024**3
DEFAULT_MAX_PIXELS = 3840 * 2160
DEFAULT_MAX_DURATION_S = 4 * 3600.0
_SIZE_SUFFIX = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


# -- value parsers (their messages become "HEATERS_X must be ..., got '...'") ------------------
def _number(what: str, *, whole: bool = False, minimum: float | None = None):
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be {what}")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be {what}") from None
        if not isinstance(value, (int, float)):
            raise ValueError(f"must be {what}")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be {what} of at least {minimum:g}")
        if whole:
            if float(value) != int(value):
                raise ValueError(f"must be {what}")
            return int(value)
        return float(value)

    return BeforeValidator(parse)


def parse_size(value: Any) -> int:
    """A byte count: an integer, or a number with a K/M/G/T suffix (``20G``, ``1.5M``, ``300KiB``)."""
    if isinstance(value, bool):
        raise ValueError("must be a byte count such as 20G or 1048576")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        raw = str(value).strip().lower().removesuffix("ib").removesuffix("b")
        body, suffix = (raw[:-1], raw[-1]) if raw and raw[-1] in _SIZE_SUFFIX else (raw, "")
        try:
            number = float(body) * _SIZE_SUFFIX[suffix]
        except ValueError:
            raise ValueError("must be a byte count such as 20G or 1048576") from None
    if number <= 0:
        raise ValueError("must be positive")
    return int(number)


def parse_stage_params(value: Any) -> dict[str, dict[str, Any]]:
    """``{"stage": {"param": value}}``: a JSON object (environment) or a TOML table. The names are
    checked against the stage table when the definitions are built (``stages.check_stage_params``)."""
    import json

    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ValueError('must be a JSON object such as {"ingest": {"detect_first": false}}') from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError('must map stage names to parameter tables, e.g. {"splice": {"min_scene_s": 2}}')
    return {str(k): dict(v) for k, v in value.items()}


Seconds = Annotated[float, _number("a number of seconds")]
Count = Annotated[int, _number("a whole number", whole=True, minimum=1)]
Pixels = Annotated[int, _number("a whole number of pixels", whole=True, minimum=1)]
Bytes = Annotated[int, BeforeValidator(parse_size)]


def _setting(default: Any, meaning: str, shown: str | None = None) -> Any:
    """A field with its README row: ``meaning`` and how the default is shown."""
    return Field(default, description=meaning, json_schema_extra={"shown": shown})


class Settings(BaseSettings):
    """Every Heaters setting. The environment variable is ``HEATERS_`` + the field name in upper
    case; the ``heaters.toml`` key is the field name."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid",
                                      case_sensitive=False)

    # -- where things live
    home: str | None = _setting(None, "project-local data: embedded Postgres, artifact store, Dagster home",
                                "`./.heaters`")
    database_url: str | None = _setting(
        None, "use a real PostgreSQL with pgvector instead of the embedded one (`postgresql://user:pw@host/db`)",
        "embedded")
    dagster_database_url: str | None = _setting(None, "Dagster's instance storage", "same server as above")
    storage_url: str | None = _setting(
        None, "artifact store: a folder, or `s3://bucket/prefix` (fsspec; `pip install -e .[s3]`)",
        "`$HEATERS_HOME/store`")
    storage_endpoint_url: str | None = _setting(
        None, "the S3 API endpoint of an S3-compatible store (MinIO, Ceph, moto); credentials come from the "
        "usual `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`", "AWS")
    # -- where stage steps run (README: "Scaling out")
    executor: Literal["multiprocess", "celery", "k8s"] = _setting(
        "multiprocess", "where stage jobs run their steps: `multiprocess` (this host), `celery` (on `heaters "
        "worker` processes over the broker below) or `k8s` (one Kubernetes pod per step; `deploy/k8s/`)",
        "`multiprocess`")
    k8s_env_secret: str = _setting("heaters-env", "`k8s`: the Kubernetes Secret whose keys become every step "
                                   "pod's environment (the `HEATERS_…` settings, database and S3 credentials)",
                                   "`heaters-env`")
    celery_broker_url: str = _setting("redis://127.0.0.1:6379/0", "the Celery broker the stage jobs and `heaters "
                                      "worker` use", "`redis://127.0.0.1:6379/0`")
    celery_backend_url: str | None = _setting(None, "the Celery result backend", "the broker URL")
    max_partitions_per_run: Count | None = _setting(
        None, "caps every stage's partitions per run (smaller runs spread over more Celery workers)",
        "the stage table's")
    # -- review
    review_token: str | None = _setting(None, "the reviewers' token for the review page's writes",
                                        "none (read-only)")
    review_url: str = _setting(
        "http://127.0.0.1:8765", "where browsers reach the review page: the Dagster UI shows sprite previews "
        "from it and links each sprite materialization to `/clip/<id>` there", "`http://127.0.0.1:8765`")
    undo_window_s: Seconds = _setting(60.0, "how long a split/merge can be undone before it runs", "60")
    auto_approve: bool = _setting(
        False, "**benchmark only** (`bench/bench_e2e.py`): the review sensor approves every `pending_review` clip "
        "as reviewer `auto-approve`; never set it where people review", "off")
    stage_params: Annotated[dict[str, dict[str, Any]], BeforeValidator(parse_stage_params)] = _setting(
        {}, "stage parameters over the stage table's defaults (`heaters_dagster/stages.py`), per stage: JSON "
        "in the environment (`{\"splice\": {\"min_scene_s\": 2}}`), a table in `heaters.toml` "
        "(`[stage_params.splice]`); the `executor` resource's `stage_params` override them", "none")
    # -- embedding model (the embedding stage, `heaters search` and the review page's similar clips)
    clip_model: str = _setting("ViT-B-32", "open_clip architecture of the embedding model", "`ViT-B-32`")
    clip_pretrained: str = _setting(
        "laion2b_s34b_b79k", "open_clip weights tag; `none` = random weights (tests only)", "`laion2b_s34b_b79k`")
    clip_checkpoint: str | None = _setting(None, "a local open_clip checkpoint file instead of named weights",
                                           "none")
    clip_precision: str = _setting("auto", "`auto`, `fp32`, `int8`, `bf16` or `fp16`", "`auto`")
    clip_device: str = _setting("auto", "`auto`, `cpu` or `cuda[:N]`", "`auto`")
    clip_batch: Count = _setting(32, "images per embedding batch", "32")
    embedding_strategy: str = _setting("keyframe_multi_avg", "how a clip's keyframe vectors become one vector",
                                       "`keyframe_multi_avg`")
    model_cache: str | None = _setting(
        None, "a pre-populated Hugging Face cache to load named weights from (else `HF_HUB_CACHE`/`HF_HOME`)",
        "Hugging Face's")
    # -- what ingest accepts
    allow_private_urls: bool = _setting(False, "fetch URLs whose host is loopback/private/link-local too", "off")
    max_source_bytes: Bytes = _setting(
        DEFAULT_MAX_SOURCE_BYTES, "largest local file accepted at submit (bytes; `K`/`M`/`G`/`T` suffixes)", "20G")
    max_pixels: Pixels = _setting(DEFAULT_MAX_PIXELS, "largest picture (width x height) ingest accepts",
                                  "3840x2160")
    max_duration_s: Seconds = _setting(DEFAULT_MAX_DURATION_S, "longest source ingest accepts, in seconds",
                                       "14400 (4 h)")
    # -- media processes
    max_ffmpeg: Count = _setting(2, "ffmpeg processes at once per process (the old system was OOM-killed "
                                 "without a bound)", "2")
    ffmpeg: str | None = _setting(None, "the ffmpeg binary", "`ffmpeg` on PATH")
    ffprobe: str | None = _setting(None, "the ffprobe binary", "`ffprobe` on PATH")
    stall_timeout_s: Seconds = _setting(120.0, "kill an ffmpeg/ffprobe/yt-dlp command that makes no progress "
                                        "for this many seconds (0: no limit)", "120")
    timeout_base_s: Seconds = _setting(300.0, "a media command's overall limit is this many seconds (0: no "
                                       "limit) ...", "300")
    timeout_per_media_s: Seconds = _setting(10.0, "... plus this many per second of media", "10")
    # -- claims and recovery
    lease_s: Seconds = _setting(120.0, "how long a claim lives without a heartbeat", "120")
    max_lost: Count = _setting(3, "lost claims after which an item is a poison item (its failure state)", "3")
    recovery_interval_s: Count = _setting(15, "how often the recovery sensor looks for expired claims", "15")
    hygiene_interval_s: Count = _setting(1800, "how often the store hygiene sensor removes orphan and temp "
                                         "files past their grace and stale scratch folders", "1800")
    # -- runs: launch cost (issue 8, part 3; measured by `heaters bench e2e`)
    batch_wait_s: Seconds = _setting(
        0.0, "stage sensors: while a stage has a run in flight, how long newly ready items are collected before "
        "the next run is requested (from when the first is seen; a full batch goes at once; 0: every tick)", "0")
    batch_size: Annotated[int, _number("a whole number", whole=True, minimum=0)] = _setting(
        0, "stage sensors: how many ready items make a full batch (0: the stage's `max_partitions_per_run`)", "0")
    inprocess_executor: bool = _setting(
        True, "run each stage job's one step inside the run worker (Dagster's `in_process_executor`) instead of "
        "a step subprocess of its own: one process launch and import less per run (0: the multiprocess "
        "executor)", "on")
    range_reach: bool = _setting(
        True, "stage sensors of stages that bridge (`max_gap`): a requested range reaches back and on over the "
        "neighbouring items still upstream of the stage, so a run that waits in the queue takes, when it starts, "
        "those that became ready meanwhile (approvals during a long sprite run), and a working run takes, when its "
        "items are done, those of its range that became ready while it worked, instead of leaving them to a run "
        "of their own (0: ranges cover the ready items only, and a run does what was ready when it started)", "on")
    chain_stages: bool = _setting(
        True, "a stage with `runs_after` in the stage table (splice after ingest) runs in the same step as that "
        "stage, right after it, on the items it finished: one sensor tick and run launch less per video (0: "
        "every stage in runs of its own)", "on")
    stream_events: bool = _setting(
        True, "a stage step records each item's materialization as the item commits, and its checks every few "
        "items, while the other items still run, instead of all of them when the step's work ends (the pool "
        "slot and the next run wait for those writes: about 10 ms an event) (0: at the end)", "on")
    sensor_interval_s: Count = _setting(
        1, "stage sensors' `minimum_interval_seconds`: Dagster's sensor daemon turns every 5 s at most, and an "
        "interval of 5 is evaluated every other turn (ticks 10 s apart); 1 means every turn", "1")
    dequeue_interval_s: Count = _setting(
        1, "how often the daemon's run queue launches queued runs (`run_coordinator` in dagster.yaml; read by "
        "`heaters dev`)", "1")
    # -- Dagster partitions
    max_partitions: Count = _setting(100_000, "the most keys the shared `clips` / `videos` partition sets keep "
                                     "(see \"Scale\")", "100000")
    partition_sweep_s: Count = _setting(300, "how often the partition retirement sensor looks", "300")
    # -- heaters doctor
    orphan_grace_s: Seconds = _setting(3600.0, "`heaters doctor` and the store hygiene sensor: age before an "
                                       "unreferenced store file or temp file counts", "3600")
    scratch_grace_s: Seconds = _setting(21600.0, "`heaters doctor`: age before an untouched scratch folder "
                                        "is stale", "21600")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # The environment overrides the file, whose values come in as init arguments.
        return (env_settings, init_settings)

    # -- derived values
    @property
    def home_path(self) -> Path:
        return Path(self.home or Path.cwd() / ".heaters").expanduser().resolve()

    @property
    def store_url(self) -> str:
        return self.storage_url or str(self.home_path / "store")

    @property
    def celery_backend(self) -> str:
        return self.celery_backend_url or self.celery_broker_url

    def embedding_params(self) -> dict[str, Any]:
        """The embedding stage's model parameters (also what search and similar clips load)."""
        pretrained = self.clip_pretrained.strip()
        return {
            "model_name": self.clip_model,
            "pretrained": None if pretrained.lower() in ("", "none", "random") else pretrained,
            "checkpoint_path": self.clip_checkpoint or None,
            "precision": self.clip_precision,
            "device": self.clip_device,
            "batch_size": self.clip_batch,
            "strategy": self.embedding_strategy,
        }


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


# Variables that are not settings of a running Heaters, listed in the same README table.
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    (CONFIG_ENV, f"the project file to read instead of looking for `{CONFIG_FILE}`; `none`: no file",
     "looked up (see above)"),
    ("HEATERS_DEV_SESSION", "set by `heaters dev` on the processes it starts (to find them); not a setting", "-"),
    ("HEATERS_TEST_DATABASE_URL", "tests: run the suite against this server instead of the embedded one", "embedded"),
    ("HEATERS_SKIP_BROWSER", "tests: `1` skips the browser tests", "run them"),
    ("HEATERS_CHROMIUM", "tests: the Chromium binary for the browser tests", "`/usr/bin/chromium`"),
    ("HEATERS_SETUP_BROWSER", "`scripts/setup.sh`: `0` skips installing Chromium", "1"),
    ("HEATERS_SETUP_CELERY", "`scripts/setup.sh`: `0` skips installing redis-server (the Celery broker)", "1"),
)


# -- finding the project file ------------------------------------------------------------------
def project_root() -> Path:
    """The folder holding workspace.yaml: the current folder or a parent, else the checkout."""
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "workspace.yaml").exists() and (d / "dagster.yaml").exists():
            return d
    return Path(__file__).resolve().parents[1]


def config_candidates() -> list[Path]:
    """Where ``heaters.toml`` is looked for, in order (without HEATERS_CONFIG)."""
    home = os.environ.get(env_name("home"))
    found = [Path(home).expanduser() / CONFIG_FILE if home else Path.cwd() / ".heaters" / CONFIG_FILE,
             Path.cwd() / CONFIG_FILE, project_root() / CONFIG_FILE]
    out: list[Path] = []
    for p in found:
        p = p.resolve()
        if p not in out:
            out.append(p)
    return out


def config_file() -> Path | None:
    """The project file in force, or None."""
    explicit = os.environ.get(CONFIG_ENV, "").strip()
    if explicit:
        if explicit.lower() == "none":
            return None
        path = Path(explicit).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={explicit}: no such file; point it at a heaters.toml or unset it")
        return path
    for path in config_candidates():
        if path.is_file():
            return path
    return None


def _is_relative_path(name: str, value: str) -> bool:
    """A file's relative path value (resolved against the file's folder, not the current one)."""
    if name in ("ffmpeg", "ffprobe") and "/" not in value:
        return False  # a command name, looked up on PATH
    if name == "storage_url" and "://" in value:
        return False
    if name not in ("home", "storage_url", "clip_checkpoint", "model_cache", "ffmpeg", "ffprobe"):
        return False
    return not Path(value).expanduser().is_absolute()


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings in a project file (keys checked, relative paths made absolute)."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    fields = Settings.model_fields
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.lower().removeprefix("heaters_")
        if name not in fields:
            raise ConfigError(f"{path}: unknown setting {key!r} (the settings: README.md, Configuration)")
        if isinstance(value, str) and value and _is_relative_path(name, value):
            value = str((path.parent / Path(value).expanduser()).resolve())
        data[name] = value
    return data


# -- loading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    settings: Settings
    file: Path | None
    file_values: dict[str, Any]

    def source(self, field: str) -> str:
        if os.environ.get(env_name(field), "") != "":
            return "environment"
        if field in self.file_values:
            return str(self.file)
        return "default"


_cache: tuple[Any, Loaded] | None = None


def _cache_key() -> Any:
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = ""
    return cwd, tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))


def load() -> Loaded:
    """The settings with where they came from (cached until a HEATERS_* variable or the current
    folder changes; :func:`reload` forgets the cache)."""
    global _cache
    key = _cache_key()
    if _cache is not None and _cache[0] == key:
        return _cache[1]
    path = config_file()
    values = read_config_file(path) if path else {}
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    loaded = Loaded(settings, path, values)
    _cache = (key, loaded)
    return loaded


def get_settings() -> Settings:
    return load().settings


def reload() -> Settings:
    global _cache
    _cache = None
    return get_settings()


def _describe(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        name = env_name(field)
        where = "environment" if os.environ.get(name, "") != "" else (str(path) if path else "?")
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"].lower()
        sep = " " if msg.startswith("must") else ": "
        lines.append(f"{name}{sep}{msg}, got {err.get('input')!r} ({where})")
    return "; ".join(lines)


def export_for_children() -> None:
    """Make the processes this one starts read the same configuration: the project file found here
    (HEATERS_CONFIG) and the resolved home (a relative default would move with their folder)."""
    loaded = load()
    if loaded.file is not None and not os.environ.get(CONFIG_ENV):
        os.environ[CONFIG_ENV] = str(loaded.file)
    os.environ[env_name("home")] = str(loaded.settings.home_path)


# -- the README table --------------------------------------------------------------------------
def readme_table() -> str:
    """README.md's Configuration table, generated from :class:`Settings`."""
    rows = ["| variable | `heaters.toml` key | meaning | default |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        shown = extra.get("shown") if isinstance(extra, dict) else None
        rows.append(f"| `{env_name(name)}` | `{name}` | {field.description} | {shown or repr(field.default)} |")
    for var, meaning, default in OTHER_VARIABLES:
        rows.append(f"| `{var}` | - | {meaning} | {default} |")
    return "\n".join(rows)


# -- the accessors the rest of the code uses ---------------------------------------------------
def heaters_home() -> Path:
    home = get_settings().home_path
    home.mkdir(parents=True, exist_ok=True)
    return home


def storage_url() -> str:
    s = get_settings()
    return s.storage_url or str(heaters_home() / "store")


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for the artifact store at ``url``: the S3 endpoint of an S3-compatible
    server (``HEATERS_STORAGE_ENDPOINT_URL``) for ``s3://`` URLs; no listings cache, because other
    workers write the same bucket."""
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return {}
    endpoint = get_settings().storage_endpoint_url
    return {"use_listings_cache": False, **({"endpoint_url": endpoint} if endpoint else {})}


def max_source_bytes() -> int:
    """HEATERS_MAX_SOURCE_BYTES: the largest local file copied into the store at submit."""
    return get_settings().max_source_bytes


def max_pixels() -> int:
    """HEATERS_MAX_PIXELS: the largest width x height of a source's picture."""
    return get_settings().max_pixels


def max_duration_s() -> float:
    """HEATERS_MAX_DURATION_S: the longest source, in seconds."""
    return get_settings().max_duration_s


def describe_settings(redact: bool = True) -> list[dict[str, Any]]:
    """Every setting with its value in force and its source (for ``heaters config``)."""
    loaded = load()
    out = []
    for name in Settings.model_fields:
        value = getattr(loaded.settings, name)
        if redact and value and name == "review_token":
            value = "***"
        elif redact and value and name.endswith("_url"):
            value = redact_url(str(value))
        out.append({"setting": name, "variable": env_name(name), "value": value, "source": loaded.source(name)})
    return out


def redact_url(value: str) -> str:
    """A URL with its password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(value)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return value
