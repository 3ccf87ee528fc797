"""CLIP embeddings of clip keyframes (no Dagster imports).

The model is loaded once per process and spec (:meth:`ClipEmbedder.load` caches it), images are
decoded and resized on a small thread pool while the previous batch runs through the model, and
every returned vector is float32 and L2-normalised, so a dot product is a cosine similarity.

Speed on CPU (see ``bench/bench_embedding.py`` and ``bench/README.md``): the default precision
``"auto"`` runs the image tower with dynamic int8 quantisation of all its transformer Linear
layers on CPU (the attention projections too, which stock ``quantize_dynamic`` leaves in fp32
inside ``nn.MultiheadAttention``) and with fp16 autocast on CUDA. Before quantising, activation
outlier channels are migrated into the weights (SmoothQuant-style, exact in fp32) using
generated calibration images: trained transformer towers can have a few activation channels far
larger than the rest, and a single int8 scale per tensor would then flatten all the others.
The int8 tower is then checked against the fp32 tower at load time; if the agreement is below
:data:`INT8_MIN_COSINE` the embedder logs a warning and runs fp32, so the fast path cannot
silently move vectors out of the fp32 model's space. The text tower runs in fp32 on CPU.

Weights: ``pretrained`` names an open_clip tag (``"laion2b_s34b_b79k"``); the file is looked up
in the Hugging Face cache first (``cache_dir`` / ``HEATERS_MODEL_CACHE`` / ``HF_HUB_CACHE`` /
``HF_HOME``) and is only downloaded when it is missing and ``HF_HUB_OFFLINE`` is not set.
``checkpoint_path`` loads a local open_clip checkpoint instead; ``pretrained=None`` (and no
checkpoint) gives random weights, seeded so that every process gets the same ones.

One concern per module:

- :mod:`.weights`: :class:`EmbeddingModelSpec`, open_clip access, finding/downloading weights.
- :mod:`.quantize`: int8 surgery on the image tower (split attention, smoothing, probe images).
- :mod:`.aggregate`: one vector per clip from its keyframe vectors.
- :mod:`.embedder`: :class:`ClipEmbedder` and :func:`embed_clip_keyframes`.

The names below are re-exported so ``from heaters_dagster.media.embedding import X`` keeps
working. Constants are looked up in their defining module at call time: to patch one (e.g.
``INT8_MIN_COSINE``) patch that module (``heaters_dagster.media.embedding.quantize``), not
this package.
"""

from __future__ import annotations

from heaters_dagster.media.embedding.aggregate import (
    MIDPOINT_TAGS,
    STRATEGIES,
    EmbeddingResult,
    aggregate,
)
from heaters_dagster.media.embedding.embedder import (
    ClipEmbedder,
    ImageInput,
    embed_clip_keyframes,
)
from heaters_dagster.media.embedding.quantize import (
    INT8_MIN_COSINE,
    PROBE_COUNT,
    probe_images,
    quantize_image_tower,
    smooth_activation_outliers,
)
from heaters_dagster.media.embedding.weights import (
    DEFAULT_PRECISION,
    ENV_MODEL_CACHE,
    MODEL_CONFIG_DIR,
    PRECISIONS,
    RANDOM_INIT_SEED,
    TINY_MODEL_NAME,
    EmbeddingModelSpec,
    hf_offline,
    resolve_cache_dir,
)

# Private names that callers written against the single-module version import from here (the
# in-process model cache and open_clip access); new code imports them from their module.
from heaters_dagster.media.embedding.embedder import _LOADED  # noqa: F401
from heaters_dagster.media.embedding.weights import _open_clip  # noqa: F401

__all__ = [
    "DEFAULT_PRECISION",
    "ENV_MODEL_CACHE",
    "INT8_MIN_COSINE",
    "MIDPOINT_TAGS",
    "MODEL_CONFIG_DIR",
    "PRECISIONS",
    "PROBE_COUNT",
    "RANDOM_INIT_SEED",
    "STRATEGIES",
    "TINY_MODEL_NAME",
    "ClipEmbedder",
    "EmbeddingModelSpec",
    "EmbeddingResult",
    "ImageInput",
    "aggregate",
    "embed_clip_keyframes",
    "hf_offline",
    "probe_images",
    "quantize_image_tower",
    "resolve_cache_dir",
    "smooth_activation_outliers",
]
