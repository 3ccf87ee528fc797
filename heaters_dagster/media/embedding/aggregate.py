"""One vector per clip from its keyframe vectors (no Dagster imports)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from heaters_dagster.errors import PermanentError

STRATEGIES = ("keyframe_multi_avg", "keyframe_midpoint")
MIDPOINT_TAGS = ("mid", "50pct")


def _l2(v: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm) or norm < 1e-12:
        raise PermanentError(f"cannot normalise {what}: its norm is {norm}")
    return (v / norm).astype(np.float32)


def aggregate(vectors: np.ndarray, tags: Sequence[str], strategy: str) -> np.ndarray:
    """One L2-normalised float32 vector for a clip from its keyframe vectors.

    ``keyframe_multi_avg``: mean of all keyframe vectors, normalised again.
    ``keyframe_midpoint``: the vector tagged ``"mid"`` (or ``"50pct"``).
    """
    if strategy not in STRATEGIES:
        raise PermanentError(f"unknown embedding strategy {strategy!r}; use one of {STRATEGIES}")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise PermanentError(
            f"need a non-empty (n, dim) array of keyframe vectors, got shape {vectors.shape}"
        )
    tags = list(tags)
    if len(tags) != vectors.shape[0]:
        raise PermanentError(f"{len(tags)} tags for {vectors.shape[0]} keyframe vectors")
    if not np.all(np.isfinite(vectors)):
        raise PermanentError("keyframe vectors contain NaN or infinity")
    if strategy == "keyframe_multi_avg":
        return _l2(vectors.mean(axis=0), "the mean keyframe vector")
    idx = _midpoint_index(tags)
    if idx is None:
        raise PermanentError(
            f"strategy keyframe_midpoint needs a keyframe tagged 'mid' or '50pct'; got tags {tags}"
        )
    return _l2(vectors[idx], f"keyframe {tags[idx]!r}")


def _midpoint_index(tags: Sequence[str]) -> int | None:
    for wanted in MIDPOINT_TAGS:
        for i, t in enumerate(tags):
            if t == wanted:
                return i
    return None


@dataclass(frozen=True)
class EmbeddingResult:
    model_id: str
    strategy: str
    dim: int
    vector: np.ndarray  # float32, (dim,), unit norm
    keyframe_count: int  # keyframe images that went into the vector (1 for keyframe_midpoint)
