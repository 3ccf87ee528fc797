"""The CLIP embedder: a loaded model that turns keyframe images (and text) into vectors (no Dagster imports).

The model is loaded once per process and spec (:meth:`ClipEmbedder.load` caches it), images are
decoded and resized on a small thread pool while the previous batch runs through the model, and
every returned vector is float32 and L2-normalised. :func:`embed_clip_keyframes` embeds the
keyframes of many clips in shared batches and aggregates them per clip.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, MutableMapping, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from heaters_dagster.errors import InvalidMediaError, PermanentError
from heaters_dagster.media.embedding import quantize
from heaters_dagster.media.embedding.aggregate import STRATEGIES, EmbeddingResult, _midpoint_index, aggregate
from heaters_dagster.media.embedding.weights import (
    RANDOM_INIT_SEED,
    EmbeddingModelSpec,
    _open_clip,
    _resolve_named_weights,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

ImageInput = Union[Path, str, Image.Image]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PermanentError(f"embedding device {device!r} requested but CUDA is not available")
    return device


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------

_LOADED: dict[EmbeddingModelSpec, "ClipEmbedder"] = {}
_LOAD_LOCK = threading.Lock()


class ClipEmbedder:
    """A loaded CLIP model. Get one with :meth:`load` (cached per spec in this process)."""

    def __init__(
        self,
        spec: EmbeddingModelSpec,
        model: Any,
        tokenizer: Any,
        device: str,
        image_tower: Any,
        precision: str,
        precision_check: dict[str, float] | None = None,
    ):
        import torch

        self.spec = spec
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.image_tower = image_tower
        self.precision = precision  # what actually runs: fp32 | int8 | bf16 | fp16
        self.precision_check = precision_check
        self.model_id = spec.model_id
        oc = _open_clip()
        cfg = oc.get_model_config(spec.model_name) or {}
        dim = cfg.get("embed_dim") or getattr(model.visual, "output_dim", None)
        self.dim = int(dim)
        pcfg = dict(oc.get_model_preprocess_cfg(model))
        size = pcfg.get("size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.image_size: tuple[int, int] = size
        self.resize_mode = pcfg.get("resize_mode") or "shortest"
        self.interpolation = pcfg.get("interpolation") or "bicubic"
        self._pil_resample = Image.BILINEAR if self.interpolation == "bilinear" else Image.BICUBIC
        self._fast_preprocess = size[0] == size[1] and self.resize_mode in ("shortest", "squash")
        self._reference_preprocess = None
        if not self._fast_preprocess:  # rare configs: use open_clip's own transform per image
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._reference_preprocess = image_transform_v2(PreprocessCfg(**pcfg), is_train=False)
        mean = torch.tensor(pcfg.get("mean"), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(pcfg.get("std"), dtype=torch.float32).view(1, 3, 1, 1)
        self._mean = mean.to(device)
        self._std = std.to(device)
        self._cpu_threads = None
        if device == "cpu":
            self._cpu_threads = spec.num_threads or _cpu_count()
        self._infer_lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: EmbeddingModelSpec | None = None) -> "ClipEmbedder":
        """The embedder for ``spec``, loading the model the first time in this process."""
        spec = spec or EmbeddingModelSpec()
        hit = _LOADED.get(spec)
        if hit is not None:
            return hit
        with _LOAD_LOCK:
            hit = _LOADED.get(spec)
            if hit is None:
                hit = _LOADED[spec] = cls._load_uncached(spec)
        return hit

    @classmethod
    def clear_cache(cls) -> None:
        """Forget every loaded model (frees memory; the next :meth:`load` loads again)."""
        with _LOAD_LOCK:
            _LOADED.clear()

    @classmethod
    def _load_uncached(cls, spec: EmbeddingModelSpec) -> "ClipEmbedder":
        import torch

        oc = _open_clip()
        if oc.get_model_config(spec.model_name) is None:
            raise PermanentError(
                f"unknown CLIP architecture {spec.model_name!r}; "
                f"known: {', '.join(oc.list_models()[:20])}, ..."
            )
        device = _resolve_device(spec.device)
        if device == "cpu":
            torch.set_num_threads(spec.num_threads or _cpu_count())

        kwargs: dict[str, Any] = {}
        weights = spec.weights_path
        if weights is not None:
            if not weights.is_file():
                raise PermanentError(f"embedding checkpoint_path {str(weights)!r} does not exist")
            pretrained: str | None = str(weights)
        elif spec.pretrained:
            pretrained, kwargs = _resolve_named_weights(spec)
        else:
            pretrained = None

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    model, _, _ = oc.create_model_and_transforms(
                        spec.model_name, pretrained=pretrained, device="cpu", **kwargs
                    )
            except PermanentError:
                raise
            except (RuntimeError, ValueError, KeyError, OSError) as exc:
                raise PermanentError(
                    f"could not load CLIP {spec.model_name} weights from {pretrained!r}: "
                    f"{type(exc).__name__}: {str(exc)[:500]}"
                ) from exc
        model.eval()
        model.requires_grad_(False)
        model.to(device)
        tokenizer = oc.get_tokenizer(spec.model_name)

        precision = spec.precision
        if precision == "auto":
            precision = "int8" if device == "cpu" else "fp16"
        if precision == "int8" and device != "cpu":
            raise PermanentError("precision 'int8' runs on CPU only; use 'fp16', 'bf16' or 'fp32' on CUDA")
        if precision == "fp16" and device == "cpu":
            raise PermanentError("precision 'fp16' needs CUDA; use 'int8', 'bf16' or 'fp32' on CPU")

        embedder = cls(spec, model, tokenizer, device, model.visual, "fp32")
        if precision == "int8":
            embedder._enable_int8()
        elif precision in ("bf16", "fp16"):
            embedder.precision = precision
        log.info(
            "loaded CLIP %s on %s (precision %s, %s threads)",
            embedder.model_id,
            device,
            embedder.precision,
            embedder._cpu_threads or "-",
        )
        return embedder

    def _enable_int8(self) -> None:
        """Swap in the int8 image tower if it agrees with fp32 on the probe images (smoothing is
        calibrated on the first half of them; the check runs on all, so half are unseen)."""
        probes = quantize.probe_images(self.image_size[0], quantize.PROBE_COUNT)
        batch = self._to_batch([self._prepare(im) for im in probes])
        ref = self._run_tower(self.model.visual, batch, "fp32")
        qtower = quantize.quantize_image_tower(self.model.visual, calib=batch[: quantize.PROBE_COUNT // 2])
        got = self._run_tower(qtower, batch, "int8")
        cos = np.sum(ref * got, axis=1)
        check = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "probes": len(probes)}
        if check["min_cosine"] >= quantize.INT8_MIN_COSINE:
            self.image_tower, self.precision, self.precision_check = qtower, "int8", check
        else:
            log.warning(
                "int8 image tower of %s disagrees with fp32 on probe images (min cosine %.4f < %.3f); "
                "using fp32",
                self.model_id,
                check["min_cosine"],
                quantize.INT8_MIN_COSINE,
            )
            self.precision_check = check

    # ---- preprocessing ---------------------------------------------------------------------

    def _open(self, item: ImageInput) -> Image.Image:
        if isinstance(item, Image.Image):
            return item
        path = Path(item)
        if not path.is_file():
            raise InvalidMediaError(f"keyframe image not found: {path}")
        try:
            im = Image.open(path)
            if self._fast_preprocess and im.format == "JPEG":
                # Let libjpeg scale down in the DCT domain, but only while the decoded image stays
                # at least twice the resize target, so bicubic still does the final filtering.
                tw, th = self._resize_dims(*im.size)
                im.draft("RGB", (2 * tw, 2 * th))
            im.load()
            return im
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise InvalidMediaError(f"cannot decode keyframe image {path}: {exc}") from exc

    def _resize_dims(self, w: int, h: int) -> tuple[int, int]:
        s = self.image_size[0]
        if self.resize_mode == "squash":
            return s, s
        # torchvision Resize(int): shortest edge -> s, long edge truncated (same as open_clip)
        if w <= h:
            return s, int(s * h / w)
        return int(s * w / h), s

    def _prepare(self, item: ImageInput) -> Any:
        """Decode + resize + centre-crop one image: uint8 HxWx3 array (normalised later on the
        whole batch), or a normalised CHW tensor for preprocess modes without a fast path."""
        im = self._open(item)
        if im.mode != "RGB":
            im = im.convert("RGB")
        if not self._fast_preprocess:
            return self._reference_preprocess(im)
        s = self.image_size[0]
        w, h = im.size
        nw, nh = self._resize_dims(w, h)
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), self._pil_resample)
        if (nw, nh) != (s, s):
            if nw < s or nh < s:  # cannot happen after a shortest-edge resize; keep torchvision's padding
                import torchvision.transforms.functional as TF

                im = TF.center_crop(im, [s, s])
            else:
                top = int(round((nh - s) / 2.0))
                left = int(round((nw - s) / 2.0))
                im = im.crop((left, top, left + s, top + s))
        return np.asarray(im, dtype=np.uint8)

    def _to_batch(self, items: Sequence[Any]) -> "torch.Tensor":
        import torch

        if self._fast_preprocess:
            x = torch.from_numpy(np.stack(items)).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)  # same as ToTensor
            return x.sub_(self._mean).div_(self._std).contiguous()  # same as Normalize
        return torch.stack(list(items)).to(self.device)

    # ---- inference -------------------------------------------------------------------------

    def _autocast(self, precision: str):
        import contextlib

        import torch

        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            return torch.autocast(
                device_type="cuda" if self.device.startswith("cuda") else "cpu", dtype=dtype
            )
        return contextlib.nullcontext()

    def _run_tower(self, tower: Any, batch: "torch.Tensor", precision: str) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast(precision):
            feats = tower(batch)
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def _set_threads(self) -> None:
        if self._cpu_threads is not None:
            import torch

            if torch.get_num_threads() != self._cpu_threads:
                torch.set_num_threads(self._cpu_threads)

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """L2-normalised float32 vectors, shape ``(len(images), dim)``, one row per image, in
        order. Batches of ``spec.batch_size``; the next batch is decoded while one runs.
        Raises :class:`InvalidMediaError` naming the first image that cannot be read."""
        vectors, errors = self._embed_images_collecting(images)
        for i, err in enumerate(errors):
            if err is not None:
                raise err
        return vectors

    def _embed_images_collecting(
        self, images: Sequence[ImageInput]
    ) -> tuple[np.ndarray, list[BaseException | None]]:
        """Like :meth:`embed_images` but an unreadable image only leaves its row NaN and its
        exception in the returned list (so one bad keyframe does not sink a whole run)."""
        n = len(images)
        out = np.full((n, self.dim), np.nan, dtype=np.float32)
        errors: list[BaseException | None] = [None] * n
        if n == 0:
            return out, errors
        bs = self.spec.batch_size
        starts = list(range(0, n, bs))
        workers = max(1, min(4, _cpu_count()))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clip-prep") as pool:

            def submit(start: int) -> list[Future]:
                return [pool.submit(self._prepare, images[i]) for i in range(start, min(start + bs, n))]

            pending = [submit(s) for s in starts[:2]]
            try:
                for bi, start in enumerate(starts):
                    futures = pending.pop(0)
                    if bi + 2 < len(starts):
                        pending.append(submit(starts[bi + 2]))
                    rows, arrays = [], []
                    for j, fut in enumerate(futures):
                        try:
                            arrays.append(fut.result())
                            rows.append(start + j)
                        except (InvalidMediaError, OSError, ValueError, Image.DecompressionBombError) as exc:
                            err = (
                                exc
                                if isinstance(exc, InvalidMediaError)
                                else InvalidMediaError(
                                    f"cannot read keyframe image {images[start + j]!r}: {exc}"
                                )
                            )
                            errors[start + j] = err
                    if arrays:
                        with self._infer_lock:
                            self._set_threads()
                            out[rows] = self._run_tower(
                                self.image_tower, self._to_batch(arrays), self.precision
                            )
            except BaseException:
                for futures in pending:
                    for fut in futures:
                        fut.cancel()
                raise
        return out, errors

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 text vectors, shape ``(len(texts), dim)`` (CLIP text tower)."""
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        text_precision = self.precision if self.precision in ("fp16", "bf16") else "fp32"
        bs = self.spec.batch_size
        with self._infer_lock:
            self._set_threads()
            for start in range(0, len(texts), bs):
                tokens = self.tokenizer(texts[start : start + bs]).to(self.device)
                with torch.inference_mode(), self._autocast(text_precision):
                    feats = self.model.encode_text(tokens)
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                out[start : start + len(tokens)] = feats.cpu().numpy()
        return out

    def __repr__(self) -> str:
        return (
            f"ClipEmbedder({self.model_id!r}, dim={self.dim}, device={self.device!r}, "
            f"precision={self.precision!r})"
        )


# --------------------------------------------------------------------------------------------
# Many clips in one pass
# --------------------------------------------------------------------------------------------


def embed_clip_keyframes(
    embedder: ClipEmbedder,
    clips: Mapping[int, Sequence[tuple[str, Path]]],
    strategy: str,
    errors: MutableMapping[int, BaseException] | None = None,
) -> dict[int, EmbeddingResult]:
    """Embed the keyframes of many clips in shared batches (one pass for the whole run), then
    aggregate per clip. ``clips`` maps clip id -> ``[(tag, image path), ...]``.

    For ``keyframe_midpoint`` only each clip's mid keyframe is decoded and embedded.
    Without ``errors`` the first failing clip raises (:class:`PermanentError` /
    :class:`InvalidMediaError`). With an ``errors`` dict, a failing clip (no keyframes, no mid
    tag, unreadable image) is left out of the result and its exception stored under its id,
    while the other clips are still embedded.
    """
    if strategy not in STRATEGIES:
        raise PermanentError(f"unknown embedding strategy {strategy!r}; use one of {STRATEGIES}")

    def fail(clip_id: int, exc: BaseException) -> None:
        if errors is None:
            raise exc
        errors[clip_id] = exc

    plan: list[tuple[int, list[str], list[int]]] = []  # clip id, tags used, rows in `images`
    images: list[ImageInput] = []
    for clip_id, keyframes in clips.items():
        keyframes = list(keyframes)
        if not keyframes:
            fail(clip_id, PermanentError(f"clip {clip_id} has no keyframes to embed"))
            continue
        if strategy == "keyframe_midpoint":
            idx = _midpoint_index([t for t, _ in keyframes])
            if idx is None:
                fail(
                    clip_id,
                    PermanentError(
                        f"clip {clip_id}: strategy keyframe_midpoint needs a keyframe tagged 'mid' or "
                        f"'50pct'; got tags {[t for t, _ in keyframes]}"
                    ),
                )
                continue
            keyframes = [keyframes[idx]]
        rows = list(range(len(images), len(images) + len(keyframes)))
        images.extend(p for _, p in keyframes)
        plan.append((clip_id, [t for t, _ in keyframes], rows))

    vectors, image_errors = embedder._embed_images_collecting(images)
    results: dict[int, EmbeddingResult] = {}
    for clip_id, tags, rows in plan:
        bad = [image_errors[r] for r in rows if image_errors[r] is not None]
        if bad:
            fail(clip_id, InvalidMediaError(f"clip {clip_id}: {bad[0]}"))
            continue
        try:
            vec = aggregate(vectors[rows], tags, strategy)
        except PermanentError as exc:
            fail(clip_id, PermanentError(f"clip {clip_id}: {exc}"))
            continue
        results[clip_id] = EmbeddingResult(
            model_id=embedder.model_id,
            strategy=strategy,
            dim=embedder.dim,
            vector=vec,
            keyframe_count=len(rows),
        )
    return results
