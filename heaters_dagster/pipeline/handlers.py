"""Stage handlers: the thin glue between a claimed item and a pure media function.

Each handler takes the item context (scratch folder, store, parameters) and a snapshot of the
claimed row, calls one media function, and describes what to persist in an ItemOutput. Handlers
never touch the database or Dagster; the executor and the IO managers do.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from heaters_dagster import storage_keys
from heaters_dagster.errors import PermanentError
from heaters_dagster.pipeline.outputs import (
    ArtifactOut,
    EmbeddingOut,
    FileToStore,
    ItemOutput,
    ItemSnapshot,
    NewClipOut,
)


def _pick(params: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: params[n] for n in names if params.get(n) is not None}


# -- video stages ------------------------------------------------------------------------------
def ingest(ctx: Any, item: ItemSnapshot) -> ItemOutput:
    from heaters_dagster.media.fetch import download_url
    from heaters_dagster.pipeline.submit import clean_title

    out_path = ctx.workdir / "normalized.mp4"
    files: list[FileToStore] = []
    if item["source_kind"] == "url":
        ctx.info(item, "downloading %s", item["source_uri"])
        dl = download_url(item["source_uri"], ctx.workdir / "download", basename="original")
        res, plan = _normalize(ctx, item, dl.path, out_path)
        title = item["title"] or clean_title(dl.title)
    else:
        if not item["original_key"]:
            raise PermanentError(f"video {item.id} has no stored original file")
        with ctx.store.local_copy(item["original_key"]) as src:
            res, plan = _normalize(ctx, item, src, out_path)
        title = item["title"]
    key = storage_keys.source_normalized(item.id)
    files.append(FileToStore(key, out_path))
    p = res.output
    frame_count = p.frame_count or int(round(p.duration_s * p.fps))
    return ItemOutput(
        item_id=item.id,
        files=files,
        updates={"normalized_key": key, "duration_s": p.duration_s, "fps": p.fps, "width": p.width,
                 "height": p.height, "frame_count": frame_count, "title": title, "scene_plan": plan},
        metadata={"duration_s": p.duration_s, "fps": p.fps, "resolution": f"{p.width}x{p.height}",
                  "frames": frame_count, "bytes": res.size_bytes, "input_codec": res.input.video_codec,
                  "scene_plan": f"{len(plan['cut_frames'])} cuts forced as keyframes" if plan else "none"},
        result=res,
    )


def _normalize(ctx: Any, item: ItemSnapshot, src: Path, out_path: Path) -> tuple[Any, dict[str, Any] | None]:
    """Normalise ``src``; with ``detect_first`` (the default) detect scenes on it first, with
    splice's parameters, and force keyframes at the cuts. Returns (result, scene plan or None).

    Limits (HEATERS_MAX_PIXELS / HEATERS_MAX_DURATION_S) are checked after the probe, before any
    decoding or transcoding: a source over one fails permanently with the limit in the message.
    A source scene detection cannot read is still normalised (normalize says precisely what is
    wrong with it, or accepts it); splice then detects on the normalised file.
    """
    from fractions import Fraction

    from heaters_dagster.errors import InvalidMediaError
    from heaters_dagster.media.normalize import check_limits, normalize
    from heaters_dagster.media.probe import probe
    from heaters_dagster.media.scenes import detect_scenes
    from heaters_dagster.pipeline.scene_plan import detection_params, make_plan
    from heaters_dagster.settings import max_duration_s, max_pixels

    opts = {**_pick(ctx.params, "crf", "preset", "audio_bitrate"), "max_pixels": max_pixels(),
            "max_duration_s": max_duration_s()}
    info = probe(src)
    check_limits(info, Path(src).name, max_pixels=opts["max_pixels"], max_duration_s=opts["max_duration_s"])
    det = None
    splice_params = ctx.params_of("splice")
    if ctx.params.get("detect_first", True):
        try:
            det = detect_scenes(src, fps=float(Fraction(info.fps_fraction)), duration_s=info.duration_s,
                                **detection_params(splice_params))
        except InvalidMediaError as exc:
            ctx.info(item, "scene detection on the source failed (%s); splice will detect on the normalised file", exc)
    res = normalize(src, out_path, keyframes=det.cut_frames if det else (), info=info, **opts)
    if det is None:
        return res, None
    if res.output.frame_count != det.frame_count:
        ctx.info(item, "the normalised file has %s frames, detection on the source counted %d: splice will "
                 "detect again", res.output.frame_count, det.frame_count)
        return res, None
    ctx.info(item, "%d cuts found on the source and forced as keyframes (%.1f s)", len(det.cut_frames),
             det.decode_seconds)
    return res, make_plan(det, splice_params)


def splice(ctx: Any, item: ItemSnapshot) -> ItemOutput:
    from heaters_dagster.media.clips import cut_clips
    from heaters_dagster.media.scenes import detect_scenes
    from heaters_dagster.pipeline.scene_plan import detection_params, plan_mismatch, result_from_plan

    if not item["normalized_key"]:
        raise PermanentError(f"video {item.id} has no normalised file; run ingest first")
    fps = float(item["fps"])
    min_scene_s = float(1.0 if ctx.params.get("min_scene_s") is None else ctx.params["min_scene_s"])
    with ctx.store.local_copy(item["normalized_key"]) as src:
        why_not = plan_mismatch(item["scene_plan"], ctx.params, item["frame_count"])
        if why_not is None:
            det = result_from_plan(item["scene_plan"], min_scene_s)
            ctx.info(item, "scenes from ingest's detection on the source")
        else:
            ctx.info(item, "detecting scenes on the normalised file: %s", why_not)
            duration = item["duration_s"]  # with fps (both from ingest), the detector's decode needs no probe
            det = detect_scenes(src, fps=fps, duration_s=float(duration) if duration is not None else None,
                                min_scene_s=min_scene_s, **detection_params(ctx.params))
        spans = [(s.start_frame, s.end_frame) for s in det.scenes]
        ctx.info(item, "%d cuts, %d scenes kept, %d dropped as too short", len(det.cut_frames), len(spans),
                 len(det.dropped))
        if not spans:
            raise PermanentError(no_clip_message(det, min_scene_s))
        cut = cut_clips(src, spans, ctx.workdir / "clips", fps=fps,
                        **_pick(ctx.params, "crf", "preset", "audio_bitrate"))
    new_clips = [
        NewClipOut(
            start_frame=c.start_frame, end_frame=c.end_frame, start_s=c.start_s, end_s=c.end_s, fps=fps,
            file=FileToStore(storage_keys.clip_file(item.id, c.start_frame, c.end_frame), c.path),
        )
        for c in cut.clips
    ]
    return ItemOutput(
        item_id=item.id,
        updates={"frame_count": det.frame_count},
        new_clips=new_clips,
        metadata={"cuts": len(det.cut_frames), "clips": len(new_clips), "dropped_scenes": len(det.dropped),
                  "frames": det.frame_count, "detect_s": round(det.decode_seconds, 3),
                  "detector": det.detector, "network_frames": det.network_frames,
                  "scenes_from": "ingest (source)" if why_not is None else "splice (normalised file)",
                  "clips_copied": cut.copied, "clip_bytes": sum(c.size_bytes for c in cut.clips)},
        result=det,
    )


def no_clip_message(det: Any, min_scene_s: float) -> str:
    """Why splicing found nothing to cut: a video shorter than one clip, or only short scenes."""
    frames = int(det.frame_count)
    seconds = frames / float(det.fps) if det.fps else 0.0
    shown = f"{frames} frame{'s' if frames != 1 else ''} ({seconds:.2f} s)"
    if seconds < min_scene_s:
        return (f"no clip: the video has {shown}; the shortest clip is min_scene_s={min_scene_s:g} s "
                "(submit a longer video, or lower the splice stage's min_scene_s)")
    scenes = len(det.scenes) + len(det.dropped)
    return (f"no clip: all {scenes} scenes of the video ({shown}) are shorter than min_scene_s="
            f"{min_scene_s:g} s (lower the splice stage's min_scene_s to keep them)")


# -- clip stages -------------------------------------------------------------------------------
def sprite(ctx: Any, item: ItemSnapshot) -> ItemOutput:
    from heaters_dagster.media.sprite import make_sprite

    out = ctx.workdir / "sprite.jpg"
    with ctx.store.local_copy(item["file_key"]) as clip_path:
        res = make_sprite(clip_path, out, **_pick(ctx.params, "tile_width", "max_fps", "jpeg_qscale"))
    layout = res.layout.to_dict()
    return ItemOutput(
        item_id=item.id,
        artifacts=[ArtifactOut("sprite", FileToStore(storage_keys.sprite(item.id), Path(res.path)),
                               metadata=layout)],
        metadata={"sprite_bytes": res.size_bytes, "frames": res.layout.frame_count,
                  "grid": f"{res.layout.cols}x{res.layout.rows}", "sheet": f"{res.layout.sheet_width}x"
                  f"{res.layout.sheet_height}", "effective_fps": res.layout.effective_fps},
        thumbnail_jpeg=res.thumbnail_jpeg,
        result=res,
    )


def keyframes(ctx: Any, item: ItemSnapshot) -> ItemOutput:
    from heaters_dagster.media.keyframes import extract_keyframes

    strategy = ctx.params.get("strategy", "multi")
    with ctx.store.local_copy(item["file_key"]) as clip_path:
        res = extract_keyframes(clip_path, ctx.workdir / "keyframes", strategy=strategy, fps=float(item["fps"]),
                                frame_count=int(item["end_frame"]) - int(item["start_frame"]),
                                **_pick(ctx.params, "jpeg_quality"))
    artifacts = [
        ArtifactOut("keyframe", FileToStore(storage_keys.keyframe(item.id, strategy, k.tag), Path(k.path)),
                    strategy=strategy, tag=k.tag,
                    metadata={"tag": k.tag, "frame_index": k.frame_index, "time_s": k.time_s, "width": k.width,
                              "height": k.height, "absolute_frame": int(item["start_frame"]) + k.frame_index})
        for k in res.keyframes
    ]
    return ItemOutput(item_id=item.id, artifacts=artifacts,
                      metadata={"strategy": strategy, "keyframes": len(artifacts),
                                "frames": ", ".join(str(k.frame_index) for k in res.keyframes)},
                      result=res)


def embedding_spec(params: dict[str, Any]) -> Any:
    """The model spec from stage parameters. Dagster config cannot carry None, so "" / "none" /
    "random" mean "no pretrained weights" and "" means "no checkpoint"."""
    from heaters_dagster.media.embedding import EmbeddingModelSpec

    kw = {k: params[k] for k in ("model_name", "pretrained", "checkpoint_path", "precision", "device",
                                 "batch_size") if k in params}
    if isinstance(kw.get("pretrained"), str) and kw["pretrained"].lower() in ("", "none", "random"):
        kw["pretrained"] = None
    if not kw.get("checkpoint_path"):
        kw["checkpoint_path"] = None
    return EmbeddingModelSpec(**kw)


def embedding(ctx: Any, items: list[ItemSnapshot]) -> dict[int, ItemOutput | BaseException]:
    """Batch handler: one model load and shared batches for every clip of the run."""
    from contextlib import ExitStack

    from heaters_dagster.media.embedding import ClipEmbedder, embed_clip_keyframes

    embedder = ClipEmbedder.load(embedding_spec(ctx.params))
    strategy = ctx.params.get("strategy", "keyframe_multi_avg")
    kf_strategy = ctx.params.get("keyframe_strategy", "multi")
    errors: dict[int, BaseException] = {}
    with ExitStack() as stack:
        clips: dict[int, list[tuple[str, Path]]] = {}
        for item in items:
            kfs = [a for a in item.artifacts if a["artifact_type"] == "keyframe" and a["strategy"] == kf_strategy]
            try:
                clips[item.id] = [(a["tag"], stack.enter_context(ctx.store.local_copy(a["storage_key"]))) for a in kfs]
            except Exception as exc:  # noqa: BLE001 - recorded per clip
                errors[item.id] = exc
        results = embed_clip_keyframes(embedder, clips, strategy, errors=errors)
    out: dict[int, ItemOutput | BaseException] = dict(errors)
    for clip_id, r in results.items():
        out[clip_id] = ItemOutput(
            item_id=clip_id,
            embedding=EmbeddingOut(model_id=r.model_id, strategy=r.strategy, vector=r.vector,
                                   keyframe_count=r.keyframe_count),
            metadata={"model_id": r.model_id, "strategy": r.strategy, "dim": r.dim, "keyframes": r.keyframe_count,
                      "device": str(embedder.device)},
            result={"model_id": r.model_id, "strategy": r.strategy, "dim": r.dim},
        )
    return out


def _source_key(item: ItemSnapshot) -> str:
    if not item.source or not item.source.get("normalized_key"):
        raise PermanentError(f"clip {item.id}: its source video has no normalised file")
    return item.source["normalized_key"]


def _cut_new_clips(ctx: Any, item: ItemSnapshot, spans: list[tuple[int, int]], origin: str,
                   parents: tuple[int, ...]) -> list[NewClipOut]:
    """Cut ``spans`` (absolute frames) from the clip's normalised source video, exactly."""
    from heaters_dagster.media.clips import cut_clips

    fps = float(item["fps"])
    with ctx.store.local_copy(_source_key(item)) as src:
        cut = cut_clips(src, spans, ctx.workdir / origin, fps=fps, **_pick(ctx.params, "crf", "preset", "audio_bitrate"))
    vid = item["source_video_id"]
    return [NewClipOut(start_frame=c.start_frame, end_frame=c.end_frame, start_s=c.start_s, end_s=c.end_s, fps=fps,
                       file=FileToStore(storage_keys.clip_file(vid, c.start_frame, c.end_frame), c.path),
                       origin=origin, parent_clip_ids=parents)
            for c in cut.clips]


def split(ctx: Any, item: ItemSnapshot) -> ItemOutput:
    op = item["pending_op"] or {}
    at = int(op.get("absolute_frame", -1))
    start, end = int(item["start_frame"]), int(item["end_frame"])
    if not start < at < end:
        raise PermanentError(f"clip {item.id}: split frame {at} is not inside [{start}, {end})")
    parts = _cut_new_clips(ctx, item, [(start, at), (at, end)], "split", (item.id,))
    ctx.info(item, "split at absolute frame %d into [%d, %d) and [%d, %d)", at, start, at, at, end)
    return ItemOutput(item_id=item.id, new_clips=parts, updates={"pending_op": None},
                      metadata={"split_frame": at, "parts": len(parts)}, result=op)


def merge(ctx: Any, item: ItemSnapshot) -> ItemOutput:
    op = item["pending_op"] or {}
    partner = int(op.get("partner", 0))
    start, end = int(op.get("start_frame", -1)), int(item["end_frame"])
    if not partner or not 0 <= start < int(item["start_frame"]):
        raise PermanentError(f"clip {item.id}: no valid merge target recorded ({op})")
    (merged,) = _cut_new_clips(ctx, item, [(start, end)], "merge", (partner, item.id))
    return ItemOutput(item_id=item.id, new_clips=[merged], updates={"pending_op": None},
                      partner_transitions=[("clip", partner, "merge_pending", "review_archived")],
                      metadata={"merged_with": partner, "frames": end - start}, result=op)


def archive(ctx: Any, item: ItemSnapshot) -> ItemOutput:
    """Delete the clip file and every artifact (deleting twice is harmless); the rows stay."""
    keys = [item["file_key"], *item.artifact_keys]
    deleted = sum(1 for k in keys if ctx.store.delete(k))
    return ItemOutput(item_id=item.id, updates={"file_deleted": True},
                      metadata={"files_deleted": deleted, "keys": len(keys)})


def thumbnail_markdown(jpeg: bytes, alt: str) -> str:
    """Dagster has no image metadata type: a small JPEG embedded in markdown shows in the UI."""
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(jpeg).decode('ascii')})"


def preview_metadata(entity: str, item_id: int, jpeg: bytes, alt: str) -> dict[str, Any]:
    """Materialization metadata that shows a sprite in the Dagster UI.

    Dagster 1.13 has no image metadata type, and its UI renders a markdown value inline only where
    it expands small values (the asset page's latest materialization and events table) and only
    under 1,000 characters; longer markdown hides behind "[Show Markdown]". So ``preview`` is short
    markdown: the middle frame served by the review page (HEATERS_REVIEW_URL), linked to the clip
    there. ``review_page`` is a URL value, a link everywhere (run logs too). ``thumbnail`` embeds
    the JPEG itself, for when the review page is not running (one click).
    """
    import dagster as dg

    from heaters_dagster.settings import get_settings

    md: dict[str, Any] = {"thumbnail": dg.MetadataValue.md(thumbnail_markdown(jpeg, alt))}
    if entity == "clip":
        base = get_settings().review_url.rstrip("/")
        page = f"{base}/clip/{item_id}"
        md["preview"] = dg.MetadataValue.md(f"[![{alt}]({base}/api/clips/{item_id}/thumbnail)]({page})")
        md["review_page"] = dg.MetadataValue.url(page)
    return md
