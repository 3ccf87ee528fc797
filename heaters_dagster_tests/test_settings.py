"""One configuration: the environment over heaters.toml, read the same way by the Dagster code
location, `heaters search` and the review page; the README table generated from the model; search
and similar clips fall back to the stored embeddings' model and say so; quiet commands and one-line
errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from starlette.testclient import TestClient

from heaters_dagster import settings as cfg
from heaters_dagster.cli.main import cli
from heaters_dagster.errors import ConfigError
from heaters_dagster.io_managers.embeddings import upsert_embedding
from heaters_dagster.media.embedding import ClipEmbedder, EmbeddingModelSpec
from heaters_dagster.review.app import create_app
from heaters_dagster.review.similar import middle_tile
from heaters_dagster.storage import ArtifactStore
from heaters_dagster_tests.factories import make_clips, make_video
from heaters_dagster_tests.review_helpers import add_sprite, numbered_sprite, simple_layout

REPO = Path(__file__).resolve().parents[1]
TINY = "heaters-tiny-vit"
TINY_ID = f"{TINY}/random"


def _child_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any Heaters setting (so only the given ones and the
    project file count), with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEATERS_", "DAGSTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _write_toml(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "heaters.toml"
    path.write_text(textwrap.dedent(body))
    return path


# -- the model, the file, the environment ------------------------------------------------------
def test_environment_overrides_the_file_and_sources_are_reported(tmp_path, monkeypatch):
    path = _write_toml(tmp_path / "proj", """
        clip_model = "from-file"
        clip_batch = 5
        max_source_bytes = "300K"
        allow_private_urls = true
        clip_checkpoint = "models/tiny.pt"
        storage_url = "store"
    """)
    monkeypatch.setenv("HEATERS_CONFIG", str(path))
    monkeypatch.setenv("HEATERS_CLIP_BATCH", "7")
    monkeypatch.delenv("HEATERS_STORAGE_URL", raising=False)
    loaded = cfg.load()
    s = loaded.settings
    assert loaded.file == path.resolve()
    assert (s.clip_model, s.clip_batch, s.max_source_bytes, s.allow_private_urls) == ("from-file", 7, 300 * 1024, True)
    assert loaded.source("clip_batch") == "environment" and loaded.source("clip_model") == str(path.resolve())
    assert loaded.source("lease_s") == "default"
    # relative paths in the file are relative to the file's folder, not the current one
    assert s.clip_checkpoint == str(tmp_path / "proj" / "models" / "tiny.pt")
    assert cfg.storage_url() == str(tmp_path / "proj" / "store")
    # the embedding stage's parameters come from the same object
    assert s.embedding_params()["model_name"] == "from-file" and s.embedding_params()["batch_size"] == 7
    monkeypatch.setenv("HEATERS_CLIP_BATCH", "")  # empty counts as unset: the file's value again
    assert cfg.get_settings().clip_batch == 5


def test_lookup_order_home_then_current_folder(tmp_path, monkeypatch):
    home, proj = tmp_path / "home", tmp_path / "proj"
    _write_toml(home, 'clip_model = "from-home"\n')
    _write_toml(proj, 'clip_model = "from-cwd"\n')
    monkeypatch.delenv("HEATERS_CONFIG")
    monkeypatch.delenv("HEATERS_CLIP_MODEL", raising=False)
    monkeypatch.setenv("HEATERS_HOME", str(home))
    monkeypatch.chdir(proj)
    assert cfg.get_settings().clip_model == "from-home"
    (home / "heaters.toml").unlink()
    assert cfg.reload().clip_model == "from-cwd"
    monkeypatch.setenv("HEATERS_CONFIG", "none")
    assert cfg.get_settings().clip_model == "ViT-B-32"
    monkeypatch.setenv("HEATERS_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="HEATERS_CONFIG=.*no such file"):
        cfg.get_settings()


def test_export_for_children_pins_the_file_and_home(tmp_path, monkeypatch):
    _write_toml(tmp_path / "proj", 'home = "data"\n')
    monkeypatch.delenv("HEATERS_CONFIG")
    monkeypatch.setenv("HEATERS_HOME", "")  # registered for restore; empty = unset
    monkeypatch.chdir(tmp_path / "proj")
    cfg.export_for_children()
    assert os.environ["HEATERS_CONFIG"] == str(tmp_path / "proj" / "heaters.toml")
    assert os.environ["HEATERS_HOME"] == str(tmp_path / "proj" / "data")


@pytest.mark.parametrize("body,env,needle", [
    ('clip_modle = "x"\n', {}, "unknown setting 'clip_modle'"),
    ("max_pixels = [\n", {}, "is not valid TOML"),
    ('lease_s = "soon"\n', {}, "HEATERS_LEASE_S must be a number of seconds, got 'soon' ("),
    ("", {"HEATERS_MAX_SOURCE_BYTES": "12Q"}, "HEATERS_MAX_SOURCE_BYTES must be a byte count such as 20G"),
    ("", {"HEATERS_MAX_FFMPEG": "0"}, "HEATERS_MAX_FFMPEG must be a whole number of at least 1"),
])
def test_bad_settings_fail_in_one_line_naming_the_setting(tmp_path, monkeypatch, body, env, needle):
    monkeypatch.setenv("HEATERS_CONFIG", str(_write_toml(tmp_path, body)))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as ei:
        cfg.get_settings()
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    out = CliRunner().invoke(cli, ["status"])
    assert out.exit_code == 1 and out.output.strip().splitlines() == [f"Error: {ei.value}"]


def test_stage_params_from_the_file_and_the_environment_reach_the_executor(tmp_path, monkeypatch):
    from heaters_dagster.definitions import build_definitions
    from heaters_dagster.stages import get_stage

    monkeypatch.setenv("HEATERS_CONFIG", str(_write_toml(tmp_path, """
        [stage_params.ingest]
        detect_first = false
        [stage_params.splice]
        min_scene_s = 2.5
        detector = "stream"
    """)))
    monkeypatch.delenv("HEATERS_STAGE_PARAMS", raising=False)
    ex = build_definitions().resources["executor"]
    assert ex.params_for(get_stage("ingest"))["detect_first"] is False
    assert ex.params_for(get_stage("splice"))["min_scene_s"] == 2.5
    # the executor's own stage_params win, key by key; the rest of the file's table stays
    ex = build_definitions(stage_params={"splice": {"min_scene_s": 0.5}}).resources["executor"]
    assert ex.params_for(get_stage("splice"))["min_scene_s"] == 0.5
    assert ex.params_for(get_stage("splice"))["detector"] == "stream"
    # the environment's JSON is merged over the file's tables
    monkeypatch.setenv("HEATERS_STAGE_PARAMS", '{"sprite": {"tile_width": 320}, "splice": {"min_scene_s": 3}}')
    ex = build_definitions().resources["executor"]
    assert ex.params_for(get_stage("sprite"))["tile_width"] == 320
    assert ex.params_for(get_stage("splice"))["min_scene_s"] == 3
    assert ex.params_for(get_stage("splice"))["detector"] == "stream"
    assert ex.params_for(get_stage("ingest"))["detect_first"] is False
    # typos are errors that name them
    for bad, needle in (('{"splcie": {}}', "unknown stage 'splcie'"),
                        ('{"splice": {"min_scene": 2}}', "unknown splice parameters: min_scene"),
                        ('[1, 2]', "HEATERS_STAGE_PARAMS must map stage names")):
        monkeypatch.setenv("HEATERS_STAGE_PARAMS", bad)
        with pytest.raises(ConfigError, match=needle):
            build_definitions()


def test_readme_table_is_generated_from_the_model():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", readme, re.S)
    assert block, "README.md lost its settings-table markers"
    assert block.group(1) == cfg.readme_table(), "README table is stale: paste `heaters config --table`"
    assert readme.count("| variable | `heaters.toml` key |") == 1  # one table


def test_every_heaters_variable_in_the_code_is_in_the_readme_table():
    table = cfg.readme_table()
    names: set[str] = set()
    for folder in ("heaters_dagster", "heaters_dagster_tests", "scripts", "bench"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".js", ".yaml") and path.is_file():
                names |= set(re.findall(r"\bHEATERS_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    names |= set(re.findall(r"\bHEATERS_[A-Z][A-Z0-9_]*[A-Z0-9]\b", (REPO / "dagster.yaml").read_text()))
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert not missing, f"not in the settings model / README table: {missing}"


def test_no_heaters_setting_is_read_from_os_environ_outside_settings():
    """Everything goes through heaters_dagster/settings.py (writing the URLs for child processes
    and the dev session marker are the exceptions)."""
    offenders = []
    for path in (REPO / "heaters_dagster").rglob("*.py"):
        if path.name == "settings.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            reads = re.search(r"(environ|getenv|envvar)\W+[\"']HEATERS_", line)
            if reads and not re.search(r"environ\[[^\]]+\]\s*=", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


# -- the code location and `heaters search` read heaters.toml ---------------------------------
_PROBE = textwrap.dedent("""
    import json
    from heaters_dagster.definitions import defs
    from heaters_dagster.stages import get_stage
    from heaters_dagster.media.ffmpeg_tools import slot
    sensor = defs.get_sensor_def("lease_recovery_sensor")
    print(json.dumps({"embedding": get_stage("embedding").params,
                      "recovery_interval_s": sensor.minimum_interval_seconds,
                      "ffmpeg_slots": slot()._initial_value}))
""")


def test_heaters_toml_in_home_reaches_the_code_location(tmp_path):
    home = tmp_path / "home"
    _write_toml(home, """
        clip_model = "heaters-tiny-vit"
        clip_pretrained = "none"
        clip_batch = 5
        clip_precision = "fp32"
        recovery_interval_s = 4
        max_ffmpeg = 3
    """)
    run = lambda **env: subprocess.run([sys.executable, "-c", _PROBE], env=_child_env(HEATERS_HOME=str(home), **env),
                                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    proc = run()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["embedding"] | {"keyframe_strategy": None} == {
        "model_name": TINY, "pretrained": None, "checkpoint_path": None, "precision": "fp32", "device": "auto",
        "batch_size": 5, "strategy": "keyframe_multi_avg", "keyframe_strategy": None}
    assert (got["recovery_interval_s"], got["ffmpeg_slots"]) == (4, 3)
    # the environment overrides the file
    proc = run(HEATERS_CLIP_BATCH="9", HEATERS_RECOVERY_INTERVAL_S="6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["embedding"]["batch_size"], got["embedding"]["model_name"], got["recovery_interval_s"]) == (9, TINY, 6)


@pytest.fixture()
def tiny() -> ClipEmbedder:
    return ClipEmbedder.load(EmbeddingModelSpec(model_name=TINY, pretrained=None, precision="fp32"))


def _embedded_clips(db, store, tiny, n=3):
    """n embedded clips with sprites and TINY_ID vectors of their middle sprite tile."""
    vid = make_video(db)
    ids = make_clips(db, vid, [(i * 48, (i + 1) * 48) for i in range(n)])
    layout = simple_layout(48)
    for i, cid in enumerate(ids):
        jpeg = numbered_sprite(layout) if i % 2 else _plain_sprite(layout, (40 * i, 200 - 30 * i, 90))
        add_sprite(db, store, cid, layout, jpeg)
        with db.session() as s:
            upsert_embedding(s, cid, tiny.model_id, "keyframe_multi_avg",
                             tiny.embed_images([middle_tile(jpeg, layout)])[0], 1)
            s.execute(text("UPDATE clips SET state = 'embedded' WHERE id = :i"), {"i": cid})
    return vid, ids, layout


def _plain_sprite(layout, colour):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (layout["sheet_width"], layout["sheet_height"]), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_heaters_search_reads_heaters_toml(db, store_dir, tiny, tmp_path):
    store = ArtifactStore(str(store_dir))
    _, ids, _ = _embedded_clips(db, store, tiny)
    home = tmp_path / "home"
    _write_toml(home, f"""
        database_url = "{db.url}"
        storage_url = "{store_dir}"
        clip_model = "{TINY}"
        clip_pretrained = "none"
    """)
    proc = subprocess.run([sys.executable, "-m", "heaters_dagster.cli.main", "search", "--clip", str(ids[0]), "-k", "2",
                           "--json"], env=_child_env(HEATERS_HOME=str(home), HF_HUB_OFFLINE="1"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert (data["model_id"], data["model_source"]) == (TINY_ID, "configured")
    assert [r["clip_id"] for r in data["results"]][0] == ids[0] and len(data["results"]) == 2
    assert proc.stderr == ""


# -- search and similar clips fall back to the stored model, and say so -----------------------
@pytest.fixture()
def cli_env(db, store_dir, monkeypatch):
    monkeypatch.setenv("HEATERS_DATABASE_URL", db.url)
    monkeypatch.setenv("HEATERS_STORAGE_URL", str(store_dir))
    return db


def test_search_falls_back_to_the_stored_model_and_says_so(cli_env, store_dir, tiny):
    """The bug: HEATERS_CLIP_PRETRAINED=none given to `heaters dev` only; `heaters search` (configured
    for ViT-B-32/laion2b_s34b_b79k, whose weights are not even on this machine) must still work."""
    from heaters_dagster.stages import get_stage

    configured = get_stage("embedding").params
    assert (configured["model_name"], configured["pretrained"]) == ("ViT-B-32", "laion2b_s34b_b79k")
    store = ArtifactStore(str(store_dir))
    _, ids, _ = _embedded_clips(cli_env, store, tiny)
    out = CliRunner().invoke(cli, ["search", "--clip", str(ids[0]), "-k", "3"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == (f"model {TINY_ID} (keyframe_multi_avg): the model of the stored embeddings; the configured "
                        "ViT-B-32/laion2b_s34b_b79k has none")
    assert lines[1].startswith(f"clip {ids[0]:>6}  100.00%")
    out = CliRunner().invoke(cli, ["search", "--text", "a red car", "-k", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data | {"results": None} == {"model_id": TINY_ID, "configured_model_id": "ViT-B-32/laion2b_s34b_b79k",
                                        "model_source": "stored", "strategy": "keyframe_multi_avg", "results": None}
    assert len(data["results"]) == 2


def test_similar_clips_fall_back_to_the_stored_model_and_say_so(db, store_dir, tiny):
    store = ArtifactStore(str(store_dir))
    vid, ids, layout = _embedded_clips(db, store, tiny)
    (pending,) = make_clips(db, vid, [(1000, 1048)], state="pending_review")
    add_sprite(db, store, pending, layout, _plain_sprite(layout, (0, 200, 90)))  # looks like ids[0]
    with TestClient(create_app(db, store, token="t")) as client:
        for cid, basis in ((pending, "middle sprite frame"), (ids[1], "stored embedding")):
            res = client.get(f"/api/clips/{cid}/similar")
            assert res.status_code == 200, res.text
            data = res.json()
            assert (data["model_id"], data["model_source"], data["configured_model_id"], data["basis"]) == (
                TINY_ID, "stored", "ViT-B-32/laion2b_s34b_b79k", basis)
            assert data["clips"]
        assert client.get(f"/api/clips/{pending}/similar").json()["clips"][0]["id"] == ids[0]


# -- quiet commands, one-line errors ----------------------------------------------------------
def test_heaters_status_on_a_fresh_home_prints_nothing_on_stderr(tmp_path):
    """The real CLI in a subprocess with its own HEATERS_HOME: it starts its own embedded Postgres
    (twice: the second start finds the vector extension there) and stops it when it exits."""
    from heaters_dagster.database.embedded import _kill_all, postgres_processes

    home = tmp_path / "home"
    env = _child_env(HEATERS_HOME=str(home))
    try:
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-m", "heaters_dagster.cli.main", "status"], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.splitlines() == ["videos: 0", "clips: 0"]
            assert proc.stderr == ""
            assert not postgres_processes(home / "pgdata"), "the embedded server was left running"
    finally:
        _kill_all(postgres_processes(home / "pgdata"), 9, 5)


def test_expected_errors_are_one_line_without_traceback(cli_env, monkeypatch):
    runner = CliRunner()
    for args, needle in ((["search", "--clip", "999999"], "clip 999999 does not exist"),
                         (["search", "--text", "a red car"], "CLIP weights ViT-B-32/laion2b_s34b_b79k are not in")):
        out = runner.invoke(cli, args)
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], out.output
    vid = make_video(cli_env)
    (cid,) = make_clips(cli_env, vid, [(0, 24)], state="pending_review")
    out = runner.invoke(cli, ["search", "--clip", str(cid)])
    assert out.exit_code == 1 and out.output.strip() == (
        f"Error: clip {cid} has no keyframe_multi_avg embedding yet (it is pending_review); only embedded clips "
        "can be searched by --clip: approve it on the review page and let the embedding stage run, or use --text")
    monkeypatch.setenv("HEATERS_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nothing")
    out = runner.invoke(cli, ["status"])
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1
    assert out.output.startswith("Error: cannot reach the database:") and "HEATERS_DATABASE_URL" in out.output
