"""Invariants a user cares about, as Dagster asset checks evaluated per partition.

Each check is a batch of plain SQL (plus, for sprites, the first bytes of each sheet) over the
partitions of one run, so it costs one or two queries per run whatever the run's size. The stage
assets evaluate their checks (``Stage.checks``) at the end of every run, for every partition of
the run's range the check applies to, and emit one ``AssetCheckEvaluation`` per partition; a run
that selects only the checks (the UI's "Execute" on a check) re-evaluates them without doing any
stage work. Checks never block: a failure is shown on the partition (ERROR severity) with the
details in its metadata, and the run's log says which ids failed.

* ``clips_tile_video`` (splice, per video) and ``cut_tiles_video`` (split/merge, per clip, about
  the clip's video): the video's current cut - every clip not replaced by a split or merge,
  reviewer-archived ones included (their frames were reviewed and dropped, not lost) - plus the
  scenes splice dropped as too short tile ``[0, frame_count)`` with no gap and no overlap;
* ``sprite_matches_layout`` (sprite, per clip): the sheet's JPEG dimensions are the layout's sheet
  size (cols x tile width, rows x tile height) and the layout's frame count fits the grid and is
  the clip's frame count sampled at the layout's rate;
* ``unit_vector`` (embedding, per clip): every embedded clip has a finite unit vector of the
  model's dimension for the configured model and strategy.

No Dagster imports here: the functions take a session and return outcomes by id.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from heaters_dagster.storage import ArtifactStore

# stage_results rows list at most this many dropped scenes (pipeline/jsonable.py truncates lists).
_RECORDED_LIST_LIMIT = 200
_JPEG_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckEnv:
    """What a check may use: a session, the store and the stage parameters of the run."""

    session: Session
    store: ArtifactStore
    params: dict[str, Any]
    splice_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InvariantCheck:
    name: str
    entity: str  # the partitions it is evaluated on
    description: str
    # (env, partition ids of the run) -> outcomes for the ids it applies to (others: no evaluation)
    evaluate: Callable[[CheckEnv, list[int]], dict[int, CheckOutcome]]


def _ids_param(sql: str, *names: str):
    return text(sql).bindparams(*(bindparam(n, expanding=True) for n in names))


# -- coverage ------------------------------------------------------------------------------------
def tiling_problems(frame_count: int, clips: Iterable[tuple[int, int]], dropped: Iterable[tuple[int, int]],
                    *, short_gap_frames: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Gaps and overlaps when ``clips`` plus ``dropped`` spans should tile ``[0, frame_count)``.
    Gaps shorter than ``short_gap_frames`` are tolerated (used only when the record of dropped
    scenes is incomplete)."""
    spans = sorted([*clips, *dropped])
    gaps: list[tuple[int, int]] = []
    overlaps: list[tuple[int, int]] = []
    pos = 0
    for a, b in spans:
        if a > pos:
            gaps.append((pos, a))
        elif a < pos:
            overlaps.append((a, min(b, pos)))
        pos = max(pos, b)
    if pos < frame_count:
        gaps.append((pos, frame_count))
    elif pos > frame_count:
        overlaps.append((frame_count, pos))  # past the end of the video
    gaps = [g for g in gaps if g[1] - g[0] >= short_gap_frames]
    return gaps, overlaps


def _spans_text(spans: list[tuple[int, int]], limit: int = 20) -> str:
    shown = ", ".join(f"[{a}, {b})" for a, b in spans[:limit])
    return shown + (f" and {len(spans) - limit} more" if len(spans) > limit else "")


def video_tiling(env: CheckEnv, video_ids: list[int]) -> dict[int, CheckOutcome]:
    """``clips_tile_video`` for the spliced videos among ``video_ids``."""
    if not video_ids:
        return {}
    s = env.session
    videos = s.execute(_ids_param(
        "SELECT id, frame_count, fps FROM source_videos WHERE id IN :ids AND state = 'spliced'", "ids"),
        {"ids": video_ids}).all()
    if not videos:
        return {}
    vids = [int(v.id) for v in videos]
    clips = s.execute(_ids_param(
        "SELECT id, source_video_id, start_frame, end_frame, state, parent_clip_ids FROM clips "
        "WHERE source_video_id IN :vids", "vids"), {"vids": vids}).all()
    recorded = s.execute(_ids_param(
        "SELECT DISTINCT ON (entity_id) entity_id, result->'dropped' AS dropped FROM stage_results "
        "WHERE stage = 'splice' AND entity_kind = 'video' AND status = 'succeeded' AND entity_id IN :vids "
        "ORDER BY entity_id, id DESC", "vids"), {"vids": vids}).all()
    dropped_by_video = {int(r.entity_id): [(int(d["start_frame"]), int(d["end_frame"])) for d in (r.dropped or [])]
                        for r in recorded}
    min_scene_s = float(env.splice_params.get("min_scene_s") or 1.0)
    by_video: dict[int, list[Any]] = {}
    for c in clips:
        by_video.setdefault(int(c.source_video_id), []).append(c)
    out: dict[int, CheckOutcome] = {}
    for v in videos:
        vid = int(v.id)
        rows = by_video.get(vid, [])
        replaced = {int(p) for c in rows for p in (c.parent_clip_ids or [])}
        cut = [(int(c.start_frame), int(c.end_frame)) for c in rows if int(c.id) not in replaced]
        dropped = dropped_by_video.get(vid, [])
        md: dict[str, Any] = {"video_id": vid, "frame_count": v.frame_count, "clips_in_cut": len(cut),
                              "dropped_scenes": len(dropped)}
        if not v.frame_count:
            out[vid] = CheckOutcome(False, f"video {vid} has no frame count", md)
            continue
        incomplete = len(dropped) >= _RECORDED_LIST_LIMIT
        short = int(math.ceil(min_scene_s * float(v.fps or 0))) if incomplete else 0
        gaps, overlaps = tiling_problems(int(v.frame_count), cut, dropped, short_gap_frames=short)
        if gaps:
            md["gaps"] = _spans_text(gaps)
        if overlaps:
            md["overlaps"] = _spans_text(overlaps)
        if gaps or overlaps:
            what = "; ".join(p for p in (f"gaps at frames {_spans_text(gaps, 5)}" if gaps else "",
                                         f"overlaps at frames {_spans_text(overlaps, 5)}" if overlaps else "") if p)
            out[vid] = CheckOutcome(False, f"video {vid}: the clips do not tile its {v.frame_count} frames: {what}",
                                    md)
        else:
            out[vid] = CheckOutcome(True, f"video {vid}: {len(cut)} clips and {len(dropped)} dropped short scenes "
                                          f"tile its {v.frame_count} frames", md)
    return out


def clip_cut_tiling(env: CheckEnv, clip_ids: list[int]) -> dict[int, CheckOutcome]:
    """``cut_tiles_video``: for each clip a split or merge replaced, its video still tiles."""
    if not clip_ids:
        return {}
    rows = env.session.execute(_ids_param(
        "SELECT c.id, c.source_video_id FROM clips c WHERE c.id IN :ids AND EXISTS ("
        "SELECT 1 FROM clips d WHERE d.source_video_id = c.source_video_id AND c.id = ANY(d.parent_clip_ids))",
        "ids"), {"ids": clip_ids}).all()
    per_video = video_tiling(env, sorted({int(r.source_video_id) for r in rows}))
    out: dict[int, CheckOutcome] = {}
    for r in rows:
        res = per_video.get(int(r.source_video_id))
        if res is not None:
            out[int(r.id)] = CheckOutcome(res.passed, f"clip {r.id}: {res.description}", {"clip_id": int(r.id),
                                                                                           **res.metadata})
    return out


# -- sprites ---------------------------------------------------------------------------------------
def jpeg_size(store: ArtifactStore, key: str) -> tuple[int, int]:
    """Width and height from the JPEG's header (the first 64 KiB; the whole file if needed)."""
    from PIL import Image

    head = store.read_head(key, _JPEG_HEAD_BYTES)
    try:
        with Image.open(io.BytesIO(head)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - header past the first bytes, or not a JPEG: read it all
        with Image.open(io.BytesIO(store.read_bytes(key))) as im:
            if im.format != "JPEG":
                raise ValueError(f"not a JPEG ({im.format})")
            return im.size


def sampled_frames(clip_frames: int, clip_fps: float, rate: float) -> int:
    """Frames ffmpeg's fps filter emits for ``clip_frames`` at ``rate`` (see media/sprite.py)."""
    return max(1, math.floor(clip_frames * rate / clip_fps + 0.5))


def sprite_problems(layout: dict[str, Any], clip_frames: int, clip_fps: float,
                    size: tuple[int, int] | None) -> list[str]:
    need = ("cols", "rows", "tile_width", "tile_height", "frame_count", "effective_fps", "sheet_width",
            "sheet_height")
    missing = [k for k in need if k not in layout]
    if missing:
        return [f"layout lacks {', '.join(missing)}"]
    cols, rows = int(layout["cols"]), int(layout["rows"])
    n, fps = int(layout["frame_count"]), float(layout["effective_fps"])
    out: list[str] = []
    if (layout["sheet_width"], layout["sheet_height"]) != (cols * layout["tile_width"], rows * layout["tile_height"]):
        out.append(f"sheet {layout['sheet_width']}x{layout['sheet_height']} is not {cols}x{rows} tiles of "
                   f"{layout['tile_width']}x{layout['tile_height']}")
    if size is not None and tuple(size) != (layout["sheet_width"], layout["sheet_height"]):
        out.append(f"JPEG is {size[0]}x{size[1]}, layout says {layout['sheet_width']}x{layout['sheet_height']}")
    if not (cols * (rows - 1) < n <= cols * rows):
        out.append(f"{n} frames do not fill a {cols}x{rows} grid's last row")
    if clip_fps > 0 and fps > 0:
        expected = sampled_frames(clip_frames, clip_fps, fps)
        if abs(n - expected) > 1:
            out.append(f"{n} frames, but the clip's {clip_frames} frames at {clip_fps:g} fps sampled at "
                       f"{fps:g} fps give {expected}")
    else:
        out.append(f"frame rates must be positive (clip {clip_fps}, sheet {fps})")
    return out


def sprite_layout(env: CheckEnv, clip_ids: list[int]) -> dict[int, CheckOutcome]:
    """``sprite_matches_layout`` for the clips among ``clip_ids`` that have a sprite sheet."""
    if not clip_ids:
        return {}
    rows = env.session.execute(_ids_param(
        "SELECT c.id, c.start_frame, c.end_frame, c.fps, a.storage_key, a.metadata AS layout "
        "FROM clips c JOIN clip_artifacts a ON a.clip_id = c.id AND a.artifact_type = 'sprite' "
        "WHERE c.id IN :ids AND NOT c.file_deleted", "ids"), {"ids": clip_ids}).all()
    out: dict[int, CheckOutcome] = {}
    for r in rows:
        layout = dict(r.layout or {})
        frames = int(r.end_frame) - int(r.start_frame)
        md: dict[str, Any] = {"clip_id": int(r.id), "clip_frames": frames,
                              "layout": f"{layout.get('cols')}x{layout.get('rows')} tiles, "
                                        f"{layout.get('frame_count')} frames"}
        try:
            size: tuple[int, int] | None = jpeg_size(env.store, r.storage_key)
            md["jpeg"] = f"{size[0]}x{size[1]}"
        except Exception as exc:  # noqa: BLE001 - reported as the check's failure
            size = None
            problems = [f"sprite file {r.storage_key} cannot be read as a JPEG ({type(exc).__name__}: {exc})"]
        else:
            problems = []
        problems += sprite_problems(layout, frames, float(r.fps), size)
        if problems:
            md["problems"] = "; ".join(problems)
            out[int(r.id)] = CheckOutcome(False, f"clip {r.id}: " + "; ".join(problems), md)
        else:
            out[int(r.id)] = CheckOutcome(True, f"clip {r.id}: {md['jpeg']} sheet matches its layout", md)
    return out


# -- embeddings ------------------------------------------------------------------------------------
def model_dimension(model_name: str) -> int | None:
    """The embedding dimension of an open_clip architecture (from its config; no weights)."""
    try:
        from heaters_dagster.media.embedding.weights import _open_clip

        cfg = _open_clip().get_model_config(model_name) or {}
    except Exception:  # noqa: BLE001 - unknown or unavailable: fall back to the stored rows
        return None
    dim = cfg.get("embed_dim")
    return int(dim) if dim else None


def unit_vectors(env: CheckEnv, clip_ids: list[int]) -> dict[int, CheckOutcome]:
    """``unit_vector`` for the clips among ``clip_ids`` in state ``embedded``."""
    if not clip_ids:
        return {}
    from heaters_dagster.pipeline.handlers import embedding_spec

    spec = embedding_spec(env.params)
    strategy = env.params.get("strategy", "keyframe_multi_avg")
    rows = env.session.execute(_ids_param(
        "SELECT c.id, e.dim, vector_dims(e.embedding) AS dims, vector_norm(e.embedding) AS norm "
        "FROM clips c LEFT JOIN embeddings e ON e.clip_id = c.id AND e.model_id = :model AND e.strategy = :strategy "
        "WHERE c.id IN :ids AND c.state = 'embedded'", "ids"),
        {"ids": clip_ids, "model": spec.model_id, "strategy": strategy}).all()
    if not rows:
        return {}
    expected = model_dimension(spec.model_name)
    out: dict[int, CheckOutcome] = {}
    for r in rows:
        md: dict[str, Any] = {"clip_id": int(r.id), "model_id": spec.model_id, "strategy": strategy,
                              "expected_dim": expected if expected is not None else "unknown"}
        if r.dims is None:
            out[int(r.id)] = CheckOutcome(False, f"clip {r.id} is embedded but has no {spec.model_id} "
                                                 f"{strategy} vector", md)
            continue
        norm = float(r.norm) if r.norm is not None else float("nan")
        md.update({"dim": int(r.dims), "norm": round(norm, 6) if math.isfinite(norm) else str(norm)})
        problems = []
        if int(r.dims) != int(r.dim):
            problems.append(f"vector has {r.dims} dimensions, the row says {r.dim}")
        if expected is not None and int(r.dims) != expected:
            problems.append(f"vector has {r.dims} dimensions, {spec.model_name} has {expected}")
        if not math.isfinite(norm) or abs(norm - 1.0) > 1e-3:
            problems.append(f"norm {norm:.6f} is not 1")
        if problems:
            out[int(r.id)] = CheckOutcome(False, f"clip {r.id}: " + "; ".join(problems), md)
        else:
            out[int(r.id)] = CheckOutcome(True, f"clip {r.id}: unit vector of dimension {r.dims}", md)
    return out


CHECKS: dict[str, InvariantCheck] = {c.name: c for c in (
    InvariantCheck("clips_tile_video", "video",
                   "The video's current cut (clips not replaced by a split or merge, reviewer-archived ones "
                   "included) plus the scenes splice dropped as too short tile its frames with no gap or overlap.",
                   video_tiling),
    InvariantCheck("cut_tiles_video", "clip",
                   "After this clip was split or merged, its video's current cut still tiles the video's frames "
                   "with no gap or overlap (dropped short scenes excepted).",
                   clip_cut_tiling),
    InvariantCheck("sprite_matches_layout", "clip",
                   "The sprite sheet's JPEG dimensions are the layout's sheet size, and the layout's frame count "
                   "fills its grid and matches the clip's frames sampled at the layout's rate.",
                   sprite_layout),
    InvariantCheck("unit_vector", "clip",
                   "Every embedded clip has a finite unit vector of the model's dimension for the configured "
                   "model and strategy.",
                   unit_vectors),
)}


def get_check(name: str) -> InvariantCheck:
    try:
        return CHECKS[name]
    except KeyError:
        raise KeyError(f"unknown check {name!r}; checks: {', '.join(CHECKS)}") from None
