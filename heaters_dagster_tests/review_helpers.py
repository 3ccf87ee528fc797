"""Helpers for the review page tests: sprite sheets (drawn with Pillow, or made by the real sprite
stage from a video whose frames carry their own number) and their artifact rows."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from heaters_dagster import storage_keys
from heaters_dagster.database.models import ClipArtifact
from heaters_dagster.resources.database import DatabaseResource
from heaters_dagster.storage import ArtifactStore

NODE = shutil.which("node")
REVIEW_JS = Path(__file__).resolve().parents[1] / "heaters_dagster" / "review" / "static" / "review.js"


def simple_layout(frame_count: int, clip_fps: float = 24.0, *, cols: int = 5, tile_width: int = 160,
                  tile_height: int = 90) -> dict[str, Any]:
    """A layout for a clip sampled at its own rate (tile i = frame i), like every clip up to 24 fps."""
    rows = math.ceil(frame_count / cols)
    return {"cols": cols, "rows": rows, "tile_width": tile_width, "tile_height": tile_height,
            "frame_count": frame_count, "effective_fps": clip_fps, "clip_duration_s": frame_count / clip_fps,
            "clip_fps": clip_fps, "sheet_width": cols * tile_width, "sheet_height": rows * tile_height}


def numbered_sprite(layout: dict[str, Any]) -> bytes:
    """A JPEG sprite sheet whose tiles show their index on a colour that changes with it."""
    tw, th = layout["tile_width"], layout["tile_height"]
    img = Image.new("RGB", (layout["sheet_width"], layout["sheet_height"]), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i in range(layout["frame_count"]):
        x, y = (i % layout["cols"]) * tw, (i // layout["cols"]) * th
        hue = (i * 37) % 256
        draw.rectangle([x, y, x + tw - 1, y + th - 1], fill=(40 + hue // 2, 60, 160 - hue // 3))
        draw.text((x + 8, y + 8), f"tile {i}", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def add_sprite(db: DatabaseResource, store: ArtifactStore, clip_id: int, layout: dict[str, Any],
               jpeg: bytes | None = None) -> str:
    data = jpeg if jpeg is not None else numbered_sprite(layout)
    key = store.put_bytes(data, storage_keys.sprite(clip_id))
    with db.session() as s:
        s.add(ClipArtifact(clip_id=clip_id, artifact_type="sprite", storage_key=key, size_bytes=len(data),
                           meta=dict(layout)))
    return key


def real_sprite(workdir: Path, fps: int, seconds: float, *,
                tile_width: int = 240) -> tuple[bytes, dict[str, Any], int]:
    """Make a video whose frames carry their number, and its sprite sheet with the real sprite
    stage code. Returns (jpeg, layout, clip frame count)."""
    from heaters_dagster.media.sprite import make_sprite
    from heaters_dagster.media.synthetic import make_video

    workdir.mkdir(parents=True, exist_ok=True)
    video = make_video(workdir / f"numbered-{fps}.mp4", (seconds,), fps=fps, audio=False, number_frames=True)
    res = make_sprite(video.path, workdir / f"sprite-{fps}.jpg", tile_width=tile_width)
    return res.path.read_bytes(), res.layout.to_dict(), video.frame_count


def tile_numbers(jpeg: bytes, layout: dict[str, Any]) -> list[int]:
    """The frame number drawn in each tile of a sheet made by :func:`real_sprite`."""
    import numpy as np

    from heaters_dagster.media.synthetic import read_frame_number

    img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
    tw, th = layout["tile_width"], layout["tile_height"]
    out = []
    for i in range(layout["frame_count"]):
        x, y = (i % layout["cols"]) * tw, (i // layout["cols"]) * th
        out.append(read_frame_number(img[y:y + th, x:x + tw]))
    return out
