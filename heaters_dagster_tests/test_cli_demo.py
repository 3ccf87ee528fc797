"""`heaters demo` as a user runs it: a fresh HEATERS_HOME, the embedded Postgres started by the
project itself, migrations, a generated sample, every stage in process, clips in pending_review
with their sprite files on disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_heaters_demo_from_a_fresh_home(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HEATERS_", "DAGSTER_"))}
    env["HEATERS_HOME"] = str(tmp_path / "home")
    heaters = Path(sys.executable).with_name("heaters")
    proc = subprocess.run([str(heaters), "demo"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    clips = re.findall(r"clip (\d+): frames \[(\d+), (\d+)\) (\w+)\s+sprite (\S+)", proc.stdout)
    assert len(clips) == 4  # 5 scenes, the 0.6 s one dropped
    for _id, _a, _b, state, sprite in clips:
        assert state == "pending_review"
        assert Path(sprite).is_file() and Path(sprite).stat().st_size > 1000
        assert Path(sprite).is_relative_to(tmp_path / "home")
    assert (tmp_path / "home" / "pgdata" / "PG_VERSION").exists()  # the embedded server was used

    status = subprocess.run([str(heaters), "status", "--json"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and '"pending_review": 4' in status.stdout
