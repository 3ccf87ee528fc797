"""CLIP weights: the model spec, open_clip access and where the weights come from (no Dagster imports).

``pretrained`` names an open_clip tag (``"laion2b_s34b_b79k"``); the file is looked up in the
Hugging Face cache first (``cache_dir`` / ``HEATERS_MODEL_CACHE`` / ``HF_HUB_CACHE`` /
``HF_HOME``) and is only downloaded when it is missing and ``HF_HUB_OFFLINE`` is not set.
``checkpoint_path`` loads a local open_clip checkpoint instead; ``pretrained=None`` (and no
checkpoint) gives random weights, seeded with :data:`RANDOM_INIT_SEED`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from heaters_dagster.errors import PermanentError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent.parent / "model_configs"  # heaters_dagster/media/model_configs
TINY_MODEL_NAME = "heaters-tiny-vit"  # 64-d test architecture registered from MODEL_CONFIG_DIR

PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")
DEFAULT_PRECISION = "auto"
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
