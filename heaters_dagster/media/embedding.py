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
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, MutableMapping, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from heaters_dagster.errors import InvalidMediaError, PermanentError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

ImageInput = Union[Path, str, Image.Image]

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
TINY_MODEL_NAME = "heaters-tiny-vit"  # 64-d test architecture registered from MODEL_CONFIG_DIR

PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")
DEFAULT_PRECISION = "auto"
STRATEGIES = ("keyframe_multi_avg", "keyframe_midpoint")
MIDPOINT_TAGS = ("mid", "50pct")
INT8_MIN_COSINE = 0.995  # load-time check of the int8 image tower against fp32 (min over probes)
PROBE_COUNT = 12  # generated images for the int8 load-time check (half calibrate the smoothing)
RANDOM_INIT_SEED = 0  # pretrained=None -> the same random weights in every process
ENV_MODEL_CACHE = "HEATERS_MODEL_CACHE"


# --------------------------------------------------------------------------------------------
# Model spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingModelSpec:
    """What to load and how to run it. Hashable: it is the key of the in-process model cache.

    ``model_id`` (the database key of the vector space) depends only on the architecture and
    the weights, not on device, precision or batch size: all of them produce vectors of the
    same space (the int8 path is checked to agree with fp32 at load time).
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint_path: str | None = None
    device: str = "auto"
    precision: str = DEFAULT_PRECISION
    batch_size: int = 32
    num_threads: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PermanentError(f"unknown embedding precision {self.precision!r}; use one of {PRECISIONS}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PermanentError(f"embedding batch_size must be a positive integer, got {self.batch_size!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise PermanentError(f"num_threads must be a positive integer or None, got {self.num_threads!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise PermanentError(f"unknown embedding device {self.device!r}; use 'auto', 'cpu' or 'cuda[:N]'")

    @property
    def weights_path(self) -> Path | None:
        """The local checkpoint file, when the weights come from one (``checkpoint_path``, or a
        ``pretrained`` value that is a path to an existing file, as open_clip also accepts)."""
        if self.checkpoint_path:
            return Path(self.checkpoint_path).expanduser()
        if (
            self.pretrained
            and (os.sep in self.pretrained or Path(self.pretrained).suffix)
            and Path(self.pretrained).expanduser().is_file()
        ):
            return Path(self.pretrained).expanduser()
        return None

    @property
    def model_id(self) -> str:
        """Stable name of architecture + weights, e.g. ``ViT-B-32/laion2b_s34b_b79k``,
        ``ViT-B-32/random`` or ``ViT-B-32/ckpt:<first 16 hex of the file's sha256>``."""
        path = self.weights_path
        if path is not None:
            return f"{self.model_name}/ckpt:{_file_sha256(path)[:16]}"
        if not self.pretrained:
            return f"{self.model_name}/random"
        return f"{self.model_name}/{self.pretrained.lower().replace('-', '_')}"  # open_clip's tag spelling


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PermanentError(f"embedding checkpoint_path {str(path)!r} does not exist") from None
    if not path.is_file():
        raise PermanentError(f"embedding checkpoint_path {str(path)!r} is not a file")
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _SHA_CACHE.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = _SHA_CACHE[key] = h.hexdigest()
    return digest


# --------------------------------------------------------------------------------------------
# open_clip access and weight resolution
# --------------------------------------------------------------------------------------------

_OPEN_CLIP_LOCK = threading.Lock()
_CONFIGS_REGISTERED = False


def _open_clip():
    """Import open_clip and register Heaters' model configs (``heaters-tiny-vit``) once."""
    global _CONFIGS_REGISTERED
    import open_clip

    if not _CONFIGS_REGISTERED:
        with _OPEN_CLIP_LOCK:
            if not _CONFIGS_REGISTERED:
                if TINY_MODEL_NAME not in open_clip.list_models():
                    open_clip.add_model_config(MODEL_CONFIG_DIR)
                _CONFIGS_REGISTERED = True
    return open_clip


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_offline() -> bool:
    """Whether Hugging Face offline mode is on (read at call time, not at import)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub missing
        return False


def resolve_cache_dir(spec_cache_dir: str | None = None) -> str:
    """The Hugging Face hub cache to use: spec, ``HEATERS_MODEL_CACHE``, ``HF_HUB_CACHE``,
    ``HF_HOME``/hub, then huggingface_hub's default (environment read at call time)."""
    if spec_cache_dir:
        return str(Path(spec_cache_dir).expanduser())
    from heaters_dagster.settings import get_settings

    if get_settings().model_cache:
        return str(Path(get_settings().model_cache).expanduser())
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return str(Path(os.environ[var]).expanduser())
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return str(Path("~/.cache/huggingface/hub").expanduser())


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """Repo id and the file names open_clip would fetch for an ``hf_hub`` entry, safetensors
    first (``'org/repo/'`` means open_clip's default file name)."""
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or "open_clip_pytorch_model.bin"
    names = []
    if filename == "open_clip_pytorch_model.bin":
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    names.append(filename)
    return repo_id, names


def _find_cached_weights(cfg: Mapping[str, Any], cache_dir: str) -> str | None:
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return str(cfg["file"])
    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, names = _hf_candidates(cfg["hf_hub"])
            for name in names:
                hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
    if cfg.get("url"):
        name = os.path.basename(cfg["url"])
        for d in (cache_dir, os.path.expanduser("~/.cache/clip")):
            cand = os.path.join(d, name)
            if os.path.isfile(cand):
                return cand
    return None


def _weights_help(spec: EmbeddingModelSpec, cfg: Mapping[str, Any], cache_dir: str) -> str:
    hub = cfg.get("hf_hub", "")
    repo_id, names = _hf_candidates(hub) if hub else ("", [])
    fetch = (
        f"`hf download {repo_id} {names[0]} --cache-dir {cache_dir}`"
        if hub
        else f"download {cfg.get('url', '?')} into {cache_dir}"
    )
    return (
        "To use local weights: (1) set checkpoint_path (HEATERS_CLIP_CHECKPOINT) to an open_clip checkpoint file "
        "(.safetensors/.bin/.pt state_dict) for this architecture, or (2) pre-populate the "
        f"Hugging Face cache on a machine with network access, e.g. {fetch}, then copy it here "
        f"and point {ENV_MODEL_CACHE} (or cache_dir / HF_HUB_CACHE / HF_HOME) at it, "
        "or (3) allow the download (unset HF_HUB_OFFLINE and give this machine network access)."
    )


def _check_hub_reachable(spec: EmbeddingModelSpec, cfg: Mapping[str, Any], cache_dir: str) -> None:
    """Fail at once (instead of after minutes of retries) when the hub's host does not even
    resolve, the usual state of a machine without network access."""
    import socket
    from urllib.parse import urlparse

    if cfg.get("hf_hub"):
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except Exception:  # pragma: no cover
            endpoint = "https://huggingface.co"
        endpoint = os.environ.get("HF_ENDPOINT") or endpoint
    else:
        endpoint = cfg.get("url", "")
    host = urlparse(endpoint).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise PermanentError(
            f"CLIP weights {spec.model_name}/{spec.pretrained} are not in the local model cache {cache_dir} "
            f"and {host} cannot be reached ({exc}). " + _weights_help(spec, cfg, cache_dir)
        ) from exc


def _resolve_named_weights(spec: EmbeddingModelSpec) -> tuple[str, dict[str, Any]]:
    """Local file for a named open_clip tag plus the preprocessing the tag asks for."""
    oc = _open_clip()
    tag = spec.pretrained or ""
    cfg = oc.get_pretrained_cfg(spec.model_name, tag)
    if not cfg:
        known = oc.list_pretrained_tags_by_model(spec.model_name)
        raise PermanentError(
            f"open_clip has no pretrained weights {tag!r} for {spec.model_name!r}"
            f" (known tags: {', '.join(known) or 'none'}); or pass a local file as checkpoint_path"
        )
    cache_dir = resolve_cache_dir(spec.cache_dir)
    local = _find_cached_weights(cfg, cache_dir)
    if local is None:
        if hf_offline():
            raise PermanentError(
                f"CLIP weights {spec.model_name}/{tag} are not in the local model cache {cache_dir} "
                f"and offline mode is on (HF_HUB_OFFLINE). " + _weights_help(spec, cfg, cache_dir)
            )
        _check_hub_reachable(spec, cfg, cache_dir)
        try:
            from open_clip.pretrained import download_pretrained

            local = download_pretrained(dict(cfg), cache_dir=cache_dir) or None
        except Exception as exc:  # network errors, auth, missing files on the hub
            raise PermanentError(
                f"could not download CLIP weights {spec.model_name}/{tag} into {cache_dir}: "
                f"{type(exc).__name__}: {str(exc)[:300]}. " + _weights_help(spec, cfg, cache_dir)
            ) from exc
        if not local or not os.path.isfile(local):
            raise PermanentError(
                f"no weights file for {spec.model_name}/{tag}. " + _weights_help(spec, cfg, cache_dir)
            )
    overrides: dict[str, Any] = {}
    for src, dst in (
        ("mean", "image_mean"),
        ("std", "image_std"),
        ("interpolation", "image_interpolation"),
        ("resize_mode", "image_resize_mode"),
    ):
        if cfg.get(src) is not None:
            overrides[dst] = cfg[src]
    if cfg.get("quick_gelu") and not (oc.get_model_config(spec.model_name) or {}).get("quick_gelu"):
        log.warning(
            "weights %s/%s were trained with QuickGELU but the %s config uses GELU "
            "(open_clip would warn the same; use the '-quickgelu' model name to match)",
            spec.model_name,
            tag,
            spec.model_name,
        )
    return local, overrides


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
# int8 image tower
# --------------------------------------------------------------------------------------------


def _make_split_attention():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class SplitSelfAttention(nn.Module):
        """Self-attention with its projections as plain ``nn.Linear`` layers (so that dynamic
        quantisation reaches them; ``nn.MultiheadAttention`` keeps raw in-proj parameters).
        Same maths as the ``nn.MultiheadAttention`` it replaces."""

        def __init__(self, mha: nn.MultiheadAttention):
            super().__init__()
            d = mha.embed_dim
            self.num_heads = mha.num_heads
            self.batch_first = bool(mha.batch_first)
            self.qkv = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
            self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
            with torch.no_grad():
                self.qkv.weight.copy_(mha.in_proj_weight)
                if mha.in_proj_bias is not None:
                    self.qkv.bias.copy_(mha.in_proj_bias)
                self.out_proj.weight.copy_(mha.out_proj.weight)
                if mha.out_proj.bias is not None:
                    self.out_proj.bias.copy_(mha.out_proj.bias)

        def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_: Any):
            if (key is not None and key is not query) or (value is not None and value is not query):
                raise RuntimeError("SplitSelfAttention only supports self-attention")
            x = query if self.batch_first else query.transpose(0, 1)
            b, n, d = x.shape
            h = self.num_heads
            qkv = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # MHA: True = masked out
                attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                    attn_mask, float("-inf")
                )
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
            o = self.out_proj(o.transpose(1, 2).reshape(b, n, d))
            return (o if self.batch_first else o.transpose(0, 1)), None

    return SplitSelfAttention


def _make_prescaled_linear():
    import torch
    from torch import nn

    class PreScaledLinear(nn.Module):
        """``linear(x * inv_scale)``: lets a Linear whose input does not come from a LayerNorm
        take part in smoothing (the per-channel multiply is cheap next to the matmul)."""

        def __init__(self, linear: nn.Linear, inv_scale: torch.Tensor):
            super().__init__()
            self.linear = linear
            self.register_buffer("inv_scale", inv_scale)

        def forward(self, x):
            return self.linear(x * self.inv_scale)

    return PreScaledLinear


def smooth_activation_outliers(tower: "torch.nn.Module", calib: "torch.Tensor", alpha: float = 0.5) -> int:
    """SmoothQuant-style migration of activation outliers into the weights, exact in fp32.

    Trained transformer towers can have a few activation channels far larger than the rest; one
    per-tensor int8 activation scale would be set by them and flatten every other channel. For each
    transformer Linear we measure ``max|x_j|`` on ``calib`` and use
    ``s_j = sqrt(max|x_j| / max|W[:, j]|)``: the Linear's input column j is multiplied by
    ``s_j`` and its input divided by ``s_j`` - folded into the LayerNorm's affine parameters
    for ``ln_1 -> attention qkv`` and ``ln_2 -> mlp.c_fc``, an explicit multiply for the
    attention output projection and ``mlp.c_proj``. Returns the number of Linears smoothed."""
    import torch
    from torch import nn

    PreScaledLinear = _make_prescaled_linear()
    targets: list[tuple[nn.Module, str, nn.Module | None]] = []  # (parent, attribute, feeding LayerNorm)
    for blk in tower.modules():
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if attn is None or mlp is None or not hasattr(attn, "qkv") or hasattr(blk, "ln_1_kv"):
            continue
        ln_1, ln_2 = getattr(blk, "ln_1", None), getattr(blk, "ln_2", None)
        targets.append((attn, "qkv", ln_1))
        targets.append((attn, "out_proj", None))
        if isinstance(getattr(mlp, "c_fc", None), nn.Linear):
            targets.append((mlp, "c_fc", ln_2))
        if isinstance(getattr(mlp, "c_proj", None), nn.Linear):
            targets.append((mlp, "c_proj", None))
    targets = [
        (
            parent,
            name,
            ln if isinstance(ln, nn.LayerNorm) and ln.weight is not None and ln.bias is not None else None,
        )
        for parent, name, ln in targets
        if isinstance(getattr(parent, name), nn.Linear)
    ]
    if not targets:
        return 0
    amax: dict[int, torch.Tensor] = {}
    hooks = []
    for i, (parent, name, _) in enumerate(targets):

        def hook(_mod, args, i=i):
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            amax[i] = m if i not in amax else torch.maximum(amax[i], m)

        hooks.append(getattr(parent, name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            tower(calib)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for i, (parent, name, ln) in enumerate(targets):
            lin = getattr(parent, name)
            a = amax[i].clamp(min=1e-5)
            w = lin.weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
            scale = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5).to(lin.weight.dtype)
            lin.weight.mul_(scale)
            if ln is not None:
                ln.weight.div_(scale)
                ln.bias.div_(scale)
            else:
                setattr(parent, name, PreScaledLinear(lin, (1.0 / scale).to(lin.weight.device)))
    return len(targets)


def quantize_image_tower(visual: "torch.nn.Module", calib: "torch.Tensor | None" = None) -> "torch.nn.Module":
    """A copy of ``visual`` whose Linear layers (MLPs and attention projections) run as dynamic
    int8 (per-channel weights, per-batch activation scale; fbgemm/x86 kernels). With ``calib``
    (a preprocessed image batch) activation outlier channels are first smoothed into the
    weights (:func:`smooth_activation_outliers`)."""
    import torch
    from torch import nn

    SplitSelfAttention = _make_split_attention()
    q = copy.deepcopy(visual)
    for mod in list(q.modules()):
        attn = getattr(mod, "attn", None)
        if (
            isinstance(attn, nn.MultiheadAttention)
            and not hasattr(mod, "ln_1_kv")  # cross-attention blocks keep the original module
            and attn._qkv_same_embed_dim
            and attn.in_proj_weight is not None
        ):
            mod.attn = SplitSelfAttention(attn)
    if calib is not None:
        smooth_activation_outliers(q, calib)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(q, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def probe_images(size: int = 224, count: int = PROBE_COUNT) -> list[Image.Image]:
    """Deterministic generated images (gradients, stripes, blobs, noise, flat colours) used to
    check a fast precision against fp32 at load time."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            img = np.stack([xx, yy, 1 - xx], -1) * 255
        elif kind == 1:
            f = 4 + 3 * i
            img = np.stack([np.sin(xx * f) * 0.5 + 0.5] * 3, -1) * rng.uniform(80, 255, 3)
        elif kind == 2:
            img = np.zeros((size, size, 3), np.float32) + rng.uniform(0, 255, 3)
            for _ in range(6):
                cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        elif kind == 3:
            img = rng.uniform(0, 255, (size, size, 3))
        elif kind == 4:
            c = ((xx * (3 + i)).astype(int) + (yy * (3 + i)).astype(int)) % 2
            img = np.stack([c] * 3, -1) * rng.uniform(0, 255, 3) + (1 - np.stack([c] * 3, -1)) * 30
        else:
            img = np.zeros((size, size, 3), np.float32) + rng.uniform(0, 255, 3)
            img[: size // 2] = rng.uniform(0, 255, 3)
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return out


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
        probes = probe_images(self.image_size[0], PROBE_COUNT)
        batch = self._to_batch([self._prepare(im) for im in probes])
        ref = self._run_tower(self.model.visual, batch, "fp32")
        qtower = quantize_image_tower(self.model.visual, calib=batch[: PROBE_COUNT // 2])
        got = self._run_tower(qtower, batch, "int8")
        cos = np.sum(ref * got, axis=1)
        check = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "probes": len(probes)}
        if check["min_cosine"] >= INT8_MIN_COSINE:
            self.image_tower, self.precision, self.precision_check = qtower, "int8", check
        else:
            log.warning(
                "int8 image tower of %s disagrees with fp32 on probe images (min cosine %.4f < %.3f); "
                "using fp32",
                self.model_id,
                check["min_cosine"],
                INT8_MIN_COSINE,
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
# Aggregation per clip
# --------------------------------------------------------------------------------------------


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
