"""Sprite sheet layout (pure) and rendering (real JPEGs read back tile by tile)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from heaters_dagster.errors import InvalidMediaError, PermanentError
from heaters_dagster.media.sprite import (
    DEFAULT_MAX_PIXELS,
    JPEG_MAX_SIDE,
    SpriteLayout,
    make_sprite,
    plan_layout,
)
from heaters_dagster.media.synthetic import make_video, read_frame_number


def fps_filter_count(frames: int, clip_fps: float, rate: float) -> int:
    """Frames ffmpeg's fps filter emits (end rounded to the nearest output tick)."""
    return max(1, math.floor(frames * rate / clip_fps + 0.5))


def check_invariants(layout: SpriteLayout, *, clip_fps: float, frames: int, max_fps: float,
                     max_pixels: int, max_side: int = JPEG_MAX_SIDE) -> None:
    assert layout.sheet_width == layout.cols * layout.tile_width <= max_side
    assert layout.sheet_height == layout.rows * layout.tile_height <= max_side
    assert layout.sheet_width * layout.sheet_height <= max_pixels
    # every sampled frame has a tile, and no row is entirely empty
    assert layout.cols * (layout.rows - 1) < layout.frame_count <= layout.cols * layout.rows
    assert 0 < layout.effective_fps <= min(clip_fps, max_fps) + 1e-9
    assert layout.frame_count == fps_filter_count(frames, clip_fps, layout.effective_fps)
    full = fps_filter_count(frames, clip_fps, min(clip_fps, max_fps))
    tile_px = layout.tile_width * layout.tile_height
    if layout.effective_fps < min(clip_fps, max_fps) - 1e-9:
        # lowered only because the full-rate frames fit in no grid at all
        capacity = (max_side // layout.tile_width) * (max_side // layout.tile_height)
        assert full * tile_px > max_pixels or full > capacity
        assert layout.frame_count < full
    else:
        assert layout.frame_count == full


@pytest.mark.parametrize(
    "seconds,cols", [(2, 5), (10, 5), (10.5, 8), (20, 8), (25, 10), (30, 10), (31, 12), (45, 12)]
)
def test_base_columns_follow_the_old_system(seconds: float, cols: int) -> None:
    frames = round(seconds * 24)
    layout = plan_layout(seconds, 24, frames, tile_height=270, max_pixels=10**12)
    assert layout.cols == cols
    assert layout.effective_fps == 24
    assert layout.frame_count == frames
    assert layout.rows == math.ceil(frames / cols)
    check_invariants(layout, clip_fps=24, frames=frames, max_fps=24, max_pixels=10**12)


def test_few_frames_use_a_single_row() -> None:
    layout = plan_layout(0.125, 24, 3, tile_height=270)
    assert (layout.cols, layout.rows, layout.frame_count) == (3, 1, 3)


def test_effective_fps_is_capped_and_never_raised() -> None:
    fast = plan_layout(2.1, 30, 63, tile_height=270)
    assert fast.effective_fps == 24 and fast.frame_count == fps_filter_count(63, 30, 24) == 50
    slow = plan_layout(4.0, 12, 48, tile_height=270)
    assert slow.effective_fps == 12 and slow.frame_count == 48
    ntsc = plan_layout(100 * 1001 / 30000, 30000 / 1001, 100, tile_height=270, max_fps=30)
    assert ntsc.effective_fps == pytest.approx(30000 / 1001) and ntsc.frame_count == 100


def test_three_minute_clip_gets_a_valid_sheet_under_the_pixel_budget() -> None:
    layout = plan_layout(180, 24, 180 * 24, tile_height=270)
    check_invariants(layout, clip_fps=24, frames=180 * 24, max_fps=24, max_pixels=DEFAULT_MAX_PIXELS)
    assert layout.cols == 12  # the old layout survives; only the rate went down
    assert layout.effective_fps < 24
    assert layout.sheet_width * layout.sheet_height > 0.95 * DEFAULT_MAX_PIXELS  # budget well used


def test_without_pixel_budget_columns_widen_to_respect_the_jpeg_limit() -> None:
    frames = 15 * 60 * 24  # 15 minutes at 24 fps: 12 columns would need 810,000 px of height
    layout = plan_layout(15 * 60, 24, frames, tile_height=270, max_pixels=10**12)
    check_invariants(layout, clip_fps=24, frames=frames, max_fps=24, max_pixels=10**12)
    assert layout.cols > 12 and layout.effective_fps == 24  # widened, rate untouched
    hours = plan_layout(2 * 3600, 24, 2 * 3600 * 24, tile_height=270, max_pixels=10**12)
    check_invariants(hours, clip_fps=24, frames=2 * 3600 * 24, max_fps=24, max_pixels=10**12)
    assert hours.effective_fps < 24  # more than the 136x242 tiles a JPEG can hold


@pytest.mark.parametrize("tile", [(480, 270), (480, 854), (320, 240), (1920, 1080), (64, 36)])
@pytest.mark.parametrize("clip_fps", [23.976, 25, 30000 / 1001, 60, 120])
@pytest.mark.parametrize("max_pixels", [DEFAULT_MAX_PIXELS, 16_000_000, 10**12])
def test_layout_invariants_hold_for_any_duration(
    tile: tuple[int, int], clip_fps: float, max_pixels: int
) -> None:
    for seconds in (0.04, 0.5, 3, 9.99, 10.01, 29.9, 59, 180, 1234.5, 4 * 3600, 30 * 3600):
        frames = max(1, round(seconds * clip_fps))
        for count in (frames, None):
            layout = plan_layout(seconds, clip_fps, count, tile_width=tile[0], tile_height=tile[1],
                                 max_pixels=max_pixels)
            check_invariants(layout, clip_fps=clip_fps, frames=frames if count else seconds * clip_fps,
                             max_fps=24, max_pixels=max_pixels)


def test_layout_rejects_impossible_requests() -> None:
    with pytest.raises(PermanentError):
        plan_layout(5, 24, 120, tile_width=70000, tile_height=10)
    with pytest.raises(PermanentError):
        plan_layout(5, 24, 120, tile_height=270, max_pixels=1000)
    with pytest.raises(PermanentError):
        plan_layout(5, 0, 120, tile_height=270)
    with pytest.raises(PermanentError):
        plan_layout(0, 24, None, tile_height=270)


def test_layout_to_dict_is_json_ready() -> None:
    layout = plan_layout(3, 24, 72, tile_height=270)
    d = json.loads(json.dumps(layout.to_dict()))
    assert d["cols"] == layout.cols and d["sheet_height"] == layout.sheet_height
    assert set(d) == {f for f in SpriteLayout.__dataclass_fields__}


# -- rendering -------------------------------------------------------------------------------------
def tiles(path: Path, layout: SpriteLayout) -> list[np.ndarray]:
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"))
    th, tw = layout.tile_height, layout.tile_width
    return [
        grey[r * th:(r + 1) * th, c * tw:(c + 1) * tw]
        for r in range(layout.rows) for c in range(layout.cols)
    ]


def test_sprite_shows_every_frame_in_order(tmp_path: Path) -> None:
    v = make_video(tmp_path / "clip.mp4", (1.0, 0.75), number_frames=True)  # 42 frames at 24 fps
    res = make_sprite(v.path, tmp_path / "out" / "sprite.jpg")
    layout = res.layout
    with Image.open(res.path) as img:
        assert img.format == "JPEG"
        assert img.size == (layout.cols * layout.tile_width, layout.rows * layout.tile_height)
    assert (layout.tile_width, layout.tile_height) == (480, 270)  # 16:9 kept
    assert layout.frame_count == v.frame_count and layout.effective_fps == 24
    assert res.size_bytes == res.path.stat().st_size
    shown = tiles(res.path, layout)
    assert [read_frame_number(t) for t in shown[: layout.frame_count]] == list(range(v.frame_count))
    assert all(t.mean() < 8 for t in shown[layout.frame_count:])  # padding tiles are black
    with Image.open(io.BytesIO(res.thumbnail_jpeg)) as thumb:
        assert thumb.format == "JPEG" and thumb.width == 160 and thumb.height == 90
        assert read_frame_number(np.asarray(thumb.convert("L"))) == v.frame_count // 2
    assert sorted(p.name for p in res.path.parent.iterdir()) == ["sprite.jpg"]


def test_sprite_resamples_faster_clips(tmp_path: Path) -> None:
    v = make_video(tmp_path / "clip30.mp4", (1.0, 1.1), fps=30, number_frames=True)
    res = make_sprite(v.path, tmp_path / "sprite.jpg", tile_width=160, max_fps=24)
    layout = res.layout
    assert layout.frame_count == fps_filter_count(v.frame_count, 30, 24)
    shown = tiles(res.path, layout)
    numbers = [read_frame_number(t) for t in shown[: layout.frame_count]]
    assert all(t.mean() > 20 for t in shown[: layout.frame_count])
    assert all(t.mean() < 8 for t in shown[layout.frame_count:])
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert all(abs(n - i * 30 / 24) <= 1 for i, n in enumerate(numbers))


def test_three_minute_clip_renders_a_decodable_sheet(tmp_path: Path) -> None:
    v = make_video(
        tmp_path / "long.mp4", (180.0,), fps=10, width=160, height=90, audio=False, preset="ultrafast"
    )
    res = make_sprite(v.path, tmp_path / "long.jpg")
    layout = res.layout
    assert layout.clip_duration_s == pytest.approx(180, abs=0.2)
    with Image.open(res.path) as img:
        assert img.size == (layout.sheet_width, layout.sheet_height)
        assert img.width <= JPEG_MAX_SIDE and img.height <= JPEG_MAX_SIDE
        assert img.width * img.height <= DEFAULT_MAX_PIXELS
        img.draft("L", (img.width // 8, img.height // 8))  # decode the whole sheet, cheaply
        small = np.asarray(img.convert("L"))
    assert layout.effective_fps < 10  # 1800 frames cannot all fit the budget
    # tiles holding a sampled frame are drawn, the rest are black padding
    sh, sw = small.shape[0] / layout.rows, small.shape[1] / layout.cols
    drawn = sum(
        small[int(r * sh):int((r + 1) * sh), int(c * sw):int((c + 1) * sw)].mean() > 20
        for r in range(layout.rows) for c in range(layout.cols)
    )
    assert drawn == layout.frame_count


def test_sprite_of_bad_input_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_text("nope")
    with pytest.raises(InvalidMediaError):
        make_sprite(bad, tmp_path / "s" / "sprite.jpg")
    assert not (tmp_path / "s").exists() or list((tmp_path / "s").iterdir()) == []
