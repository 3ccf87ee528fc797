"""Similarity search over clip embeddings in pgvector.

Queries order by cosine distance on ``embedding::vector(dim)`` restricted to one model and
strategy, so the (model, dim) partial HNSW index serves them (the model id and the limit are
written into the SQL as literals, so even a cached generic plan can match the partial index).
Filters use pgvector's iterative index scans (``hnsw.iterative_scan = relaxed_order``) inside a
materialised CTE that is re-sorted exactly. A filter never silently returns fewer than k
results when more exist: a query restricted to one source video is answered exactly (a video is
small, and an index walk through every other video's rows is both slower and less accurate, as
``bench/bench_search.py`` measured), and an index search that comes back short (pgvector stops
after ``hnsw.max_scan_tuples``) is repeated exactly.

Which model's vectors are searched (:func:`choose_model`): the configured one (the embedding
stage's settings), unless it has no stored embeddings and another model has, as when the pipeline
ran with other settings than the command (``HEATERS_CLIP_PRETRAINED=none`` given to ``heaters dev``
only): then the stored embeddings' model is used, and the caller says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from heaters_dagster.database.engine import sql_literal
from heaters_dagster.database.models import Clip, Embedding
from heaters_dagster.errors import PermanentError

DEFAULT_STATES: tuple[str, ...] = ("embedded",)



@dataclass(frozen=True)
class SearchHit:
    clip_id: int
    similarity: float  # 1 - cosine distance
    source_video_id: int
    start_s: float
    end_s: float
    state: str
    file_key: str
    file_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelChoice:
    """The model whose vectors a search uses, and why."""

    model_id: str
    configured_model_id: str
    strategy: str

    @property
    def source(self) -> str:
        """``configured``, or ``stored`` when the configured model has no embeddings to search."""
        return "configured" if self.model_id == self.configured_model_id else "stored"

    def describe(self) -> str:
        if self.source == "configured":
            return f"model {self.model_id} ({self.strategy})"
        return (f"model {self.model_id} ({self.strategy}): the model of the stored embeddings; the configured "
                f"{self.configured_model_id} has none")

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "configured_model_id": self.configured_model_id,
                "model_source": self.source, "strategy": self.strategy}


def stored_models(session: Session, strategy: str, clip_id: int | None = None) -> list[str]:
    """Model ids with stored embeddings of ``strategy``: one clip's (newest first), or all (most
    embeddings first; an index-only scan of ix_embeddings_model_strategy)."""
    if clip_id is not None:
        sql = ("SELECT model_id FROM embeddings WHERE clip_id = :clip AND strategy = :strategy "
               "ORDER BY updated_at DESC, model_id")
    else:
        sql = ("SELECT model_id FROM embeddings WHERE strategy = :strategy GROUP BY model_id "
               "ORDER BY count(*) DESC, model_id")
    return [r.model_id for r in session.execute(text(sql), {"strategy": strategy, "clip": clip_id})]


def has_embeddings(session: Session, model_id: str, strategy: str) -> bool:
    return bool(session.execute(text("SELECT EXISTS (SELECT 1 FROM embeddings WHERE model_id = :m AND "
                                     "strategy = :s)"), {"m": model_id, "s": strategy}).scalar())


def choose_model(session: Session, configured_model_id: str, strategy: str,
                 clip_id: int | None = None) -> ModelChoice:
    """The model to search with: of ``clip_id``'s stored embeddings (when given and it has any) the
    configured model's, else its newest; otherwise the configured model when it has stored
    embeddings, else the stored model with the most embeddings (the configured one when none are
    stored at all)."""
    def chosen(model_id: str) -> ModelChoice:
        return ModelChoice(model_id, configured_model_id, strategy)

    if clip_id is not None:
        own = stored_models(session, strategy, clip_id)
        if own:
            return chosen(configured_model_id if configured_model_id in own else own[0])
    if has_embeddings(session, configured_model_id, strategy):
        return chosen(configured_model_id)
    stored = stored_models(session, strategy)
    return chosen(stored[0] if stored else configured_model_id)


def spec_for_model(model_id: str, configured: Any) -> Any:
    """An embedding model spec that produces ``model_id``'s vectors, from the configured spec (device,
    precision and batch size kept). A checkpoint model can only be the configured one."""
    if model_id == configured.model_id:
        return configured
    name, _, weights = model_id.partition("/")
    if weights.startswith("ckpt:"):
        raise PermanentError(
            f"the stored embeddings were made with a checkpoint file ({model_id}); set HEATERS_CLIP_CHECKPOINT "
            "(or clip_checkpoint in heaters.toml) to that file")
    return replace(configured, model_name=name, pretrained=None if weights == "random" else weights,
                   checkpoint_path=None)


def clip_vector(session: Session, clip_id: int, model_id: str, strategy: str) -> np.ndarray:
    row = session.execute(select(Embedding.embedding).where(
        Embedding.clip_id == clip_id, Embedding.model_id == model_id, Embedding.strategy == strategy)).first()
    if row is None:
        raise PermanentError(f"clip {clip_id} has no {strategy} embedding for model {model_id}")
    return np.asarray(row[0], dtype=np.float32)


def search_vector(session: Session, query: np.ndarray, *, model_id: str, strategy: str, k: int = 10,
                  source_video_id: int | None = None, states: Sequence[str] | None = DEFAULT_STATES,
                  exclude_clip_id: int | None = None, ef_search: int = 100) -> list[SearchHit]:
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    dim = int(q.size)
    if not 1 <= k <= 1000:
        raise PermanentError("k must be between 1 and 1000")
    filters = [f"e.model_id = {sql_literal(model_id)}", "e.strategy = :strategy", f"e.dim = {dim}"]
    params: dict[str, Any] = {"strategy": strategy, "q": q.tolist()}
    if source_video_id is not None:
        filters.append("c.source_video_id = :vid")
        params["vid"] = source_video_id
    if states:
        filters.append("c.state = ANY(:states)")
        params["states"] = list(states)
    if exclude_clip_id is not None:
        filters.append("e.clip_id <> :exclude")
        params["exclude"] = exclude_clip_id

    def run(exact: bool) -> list[Any]:
        # Without the ::vector(dim) cast the expression does not match the index: an exact scan.
        col = "e.embedding" if exact else f"e.embedding::vector({dim})"
        sql = f"""
            WITH nearest AS MATERIALIZED (
                SELECT e.clip_id, {col} <=> CAST(:q AS vector({dim})) AS distance
                FROM embeddings e JOIN clips c ON c.id = e.clip_id
                WHERE {' AND '.join(filters)}
                ORDER BY {col} <=> CAST(:q AS vector({dim}))
                LIMIT {int(k)}
            )
            SELECT n.clip_id, n.distance, c.source_video_id, c.start_s, c.end_s, c.state, c.file_key
            FROM nearest n JOIN clips c ON c.id = n.clip_id
            ORDER BY n.distance, n.clip_id
        """
        return list(session.execute(text(sql), params).all())

    session.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
    session.execute(text(f"SET LOCAL hnsw.ef_search = {max(int(ef_search), k)}"))
    exact = source_video_id is not None
    rows = run(exact)
    if not exact and len(rows) < k:
        rows = run(True)  # the index walk stopped early; the exact answer has every row that exists
    return [SearchHit(clip_id=r.clip_id, similarity=1.0 - float(r.distance), source_video_id=r.source_video_id,
                      start_s=r.start_s, end_s=r.end_s, state=r.state, file_key=r.file_key) for r in rows]


def search_by_clip(session: Session, clip_id: int, *, model_id: str, strategy: str, **kw: Any) -> list[SearchHit]:
    clip = session.get(Clip, clip_id)
    if clip is None:
        raise PermanentError(f"clip {clip_id} does not exist")
    if not stored_models(session, strategy, clip_id):
        raise PermanentError(
            f"clip {clip_id} has no {strategy} embedding yet (it is {clip.state}); only embedded clips can be "
            "searched by --clip: approve it on the review page and let the embedding stage run, or use --text")
    return search_vector(session, clip_vector(session, clip_id, model_id, strategy), model_id=model_id,
                         strategy=strategy, **kw)


def search_by_text(session: Session, embedder: Any, query: str, *, strategy: str, **kw: Any) -> list[SearchHit]:
    if not query.strip():
        raise PermanentError("the text query is empty")
    vec = embedder.embed_text([query])[0]
    return search_vector(session, vec, model_id=embedder.model_id, strategy=strategy, **kw)
