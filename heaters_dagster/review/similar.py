""""Similar clips" for the review page.

A clip under review has no embedding yet (only approved clips are embedded), so its vector is
computed on the fly from the middle tile of its sprite sheet with the embedding stage's model
(loaded once per process); a clip that already has a stored vector uses that. The neighbours
come from the same pgvector search as ``heaters search``, with the same choice of model: the
configured one, or the stored embeddings' model when the configured one has none (the answer's
``model_id``, ``configured_model_id`` and ``model_source`` say which).
"""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from heaters_dagster.database.models import Clip, ClipArtifact
from heaters_dagster.errors import HeatersError, PermanentError
from heaters_dagster.pipeline.handlers import embedding_spec
from heaters_dagster.search import choose_model, clip_vector, search_vector, spec_for_model
from heaters_dagster.stages import get_stage
from heaters_dagster.storage import ArtifactStore


class SimilarUnavailable(HeatersError):
    """Similar clips cannot be computed; ``reason`` is one short line for the page (the detail,
    which may name cache paths, is the exception's ``__cause__`` and goes to the server log)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


LOAD_RETRY_S = 300.0
_load_failures: dict[Any, tuple[float, BaseException]] = {}


def _load_embedder(cls: Any, spec: Any) -> Any:
    """The embedding model, or SimilarUnavailable("no embedding model"). A failed load (weights
    missing offline, a bad checkpoint) is remembered for LOAD_RETRY_S, so the page does not retry
    a slow failing load for every clip it shows."""
    failed = _load_failures.get(spec)
    if failed is not None and time.monotonic() - failed[0] < LOAD_RETRY_S:
        raise SimilarUnavailable("no embedding model") from failed[1]
    try:
        embedder = cls.load(spec)
    except Exception as exc:  # noqa: BLE001 - weights missing offline, bad checkpoint, ...
        _load_failures[spec] = (time.monotonic(), exc)
        raise SimilarUnavailable("no embedding model") from exc
    _load_failures.pop(spec, None)
    return embedder


def middle_tile(sprite_jpeg: bytes, layout: dict[str, Any]) -> Image.Image:
    """Crop the sprite tile in the middle of the clip."""
    with Image.open(io.BytesIO(sprite_jpeg)) as im:
        n = max(1, int(layout["frame_count"]))
        i = n // 2
        cols, tw, th = int(layout["cols"]), int(layout["tile_width"]), int(layout["tile_height"])
        x, y = (i % cols) * tw, (i // cols) * th
        return im.convert("RGB").crop((x, y, x + tw, y + th))


def similar_clips(session: Session, store: ArtifactStore, clip_id: int, k: int = 6) -> dict[str, Any]:
    from heaters_dagster.media.embedding import ClipEmbedder

    if session.get(Clip, clip_id) is None:
        raise LookupError(f"clip {clip_id} does not exist")
    params = get_stage("embedding").params
    spec = embedding_spec(params)
    strategy = params["strategy"]
    model = choose_model(session, spec.model_id, strategy, clip_id=clip_id)
    try:
        vector, basis = clip_vector(session, clip_id, model.model_id, strategy), "stored embedding"
    except PermanentError:
        sprite = session.execute(select(ClipArtifact).where(ClipArtifact.clip_id == clip_id,
                                                            ClipArtifact.artifact_type == "sprite")).scalar()
        if sprite is None:
            raise SimilarUnavailable("no sprite sheet yet") from None
        try:
            tile = middle_tile(store.read_bytes(sprite.storage_key), sprite.meta)
        except (FileNotFoundError, PermanentError, KeyError, ValueError, OSError) as exc:
            raise SimilarUnavailable("the sprite sheet cannot be read") from exc
        embedder = _load_embedder(ClipEmbedder, spec_for_model(model.model_id, spec))
        vector, basis = embedder.embed_images([tile])[0], "middle sprite frame"
    hits = search_vector(session, vector, model_id=model.model_id, strategy=strategy, k=k, exclude_clip_id=clip_id)
    return {"clip_id": clip_id, **model.to_dict(), "basis": basis,
            "clips": [{"id": h.clip_id, "similarity": round(h.similarity, 4), "source_video_id": h.source_video_id,
                       "start_s": h.start_s, "end_s": h.end_s} for h in hits]}
