"""Storage keys, built only from database ids, frame numbers and fixed words."""

from __future__ import annotations

import re
import secrets


def _ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    return ext if re.fullmatch(r"[a-z0-9]{1,5}", ext) else "bin"


def source_original(video_id: int, ext: str) -> str:
    return f"sources/{int(video_id)}/original.{_ext(ext)}"


def source_normalized(video_id: int) -> str:
    return f"sources/{int(video_id)}/normalized.mp4"


def clip_file(video_id: int, start_frame: int, end_frame: int) -> str:
    """A fresh key per cut (a token keeps a re-cut of the same frames from overwriting a live file)."""
    return f"sources/{int(video_id)}/clips/{int(start_frame):08d}-{int(end_frame):08d}-{secrets.token_hex(4)}.mp4"


def sprite(clip_id: int) -> str:
    return f"clips/{int(clip_id)}/sprite.jpg"


def keyframe(clip_id: int, strategy: str, tag: str) -> str:
    safe = lambda s: re.sub(r"[^a-z0-9_]", "_", s.lower())  # noqa: E731 - strategy/tag are ours, still sanitised
    return f"clips/{int(clip_id)}/keyframes/{safe(strategy)}_{safe(tag)}.jpg"
