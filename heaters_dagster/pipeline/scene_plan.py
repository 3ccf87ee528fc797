"""The scene plan: scene detection run by ingest, on the source, before it is normalised.

Detecting first lets ingest force a keyframe at every cut (``normalize(keyframes=)``), so splice
cuts each clip by stream copy: the media is encoded once, not twice. The plan is stored on the
video row (``source_videos.scene_plan``) and used by splice only when it still describes what
splice would detect:

- the detection parameters (detector, threshold, hybrid overrides) are splice's current ones
  (a re-run from the UI with other parameters detects again, on the normalised file);
- the normalised file has exactly the frames the detection counted (the decode and the encode
  resample to the same constant rate with the same ``fps`` filter, so they number frames alike;
  a different count means they did not, and splice detects again).

``min_scene_s`` is applied by splice to the plan's cuts, so changing it needs no new detection.
Whether a clip is copied is decided from the normalised file's own keyframes
(:func:`heaters_dagster.media.clips.keyframe_frames`), never from the plan.
"""

from __future__ import annotations

from typing import Any

# splice parameters that change what the detector finds (min_scene_s only filters its scenes)
DETECTION_PARAMS = ("detector", "threshold", "hybrid")


def detection_params(params: dict[str, Any]) -> dict[str, Any]:
    """The detection parameters of a splice parameter set, as detect_scenes takes them."""
    return {n: params[n] for n in DETECTION_PARAMS if params.get(n) is not None}


def make_plan(det: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The JSON stored on the video row from a detection result and splice's parameters."""
    return {
        "params": detection_params(params),
        "detector": det.detector,
        "fps": det.fps,
        "frame_count": det.frame_count,
        "cut_frames": [int(c) for c in det.cut_frames],
        "detect_s": round(det.decode_seconds, 3),
        "network_frames": det.network_frames,
    }


def plan_mismatch(plan: dict[str, Any] | None, params: dict[str, Any], frame_count: int | None) -> str | None:
    """Why the stored plan cannot be used (None: it can)."""
    if not plan:
        return "no scene plan from ingest"
    if plan.get("params") != detection_params(params):
        return f"detection parameters changed since ingest ({plan.get('params')} -> {detection_params(params)})"
    if frame_count is None or plan.get("frame_count") != int(frame_count):
        return f"the plan counted {plan.get('frame_count')} frames, the normalised file has {frame_count}"
    return None


def result_from_plan(plan: dict[str, Any], min_scene_s: float) -> Any:
    """The plan as a SceneDetectionResult (scenes split at ``min_scene_s``), detection time 0."""
    from heaters_dagster.media.scenes import SceneDetectionResult, split_scenes

    cuts = tuple(int(c) for c in plan["cut_frames"])
    fps, frames = float(plan["fps"]), int(plan["frame_count"])
    kept, dropped = split_scenes(cuts, frames, fps, min_scene_s)
    return SceneDetectionResult(fps=fps, frame_count=frames, cut_frames=cuts, scenes=kept, dropped=dropped,
                                analysis_size=(0, 0), decode_seconds=0.0, detector=str(plan["detector"]),
                                network_frames=int(plan.get("network_frames") or 0))
