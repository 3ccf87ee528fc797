"""Recording the ffmpeg/ffprobe invocations a media module makes (through its ``run``)."""

from __future__ import annotations

from types import ModuleType

import pytest


def spy_ffmpeg(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[list[str]]:
    """Patch ``module.run`` to record each argument list (and still run it); return the record."""
    calls: list[list[str]] = []
    real_run = module.run

    def spy(args, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(args))
        return real_run(args, **kw)

    monkeypatch.setattr(module, "run", spy)
    return calls
