"""int8 surgery on the CLIP image tower (no Dagster imports).

Stock ``quantize_dynamic`` leaves the attention projections inside ``nn.MultiheadAttention`` in
fp32, so they are first split into plain ``nn.Linear`` layers; activation outlier channels are
migrated into the weights (SmoothQuant-style, exact in fp32) on generated calibration images
(:func:`probe_images`), then every transformer Linear runs as dynamic int8. The embedder checks
the result against fp32 at load time and keeps fp32 when the agreement is below
:data:`INT8_MIN_COSINE`.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    import torch

INT8_MIN_COSINE = 0.995  # load-time check of the int8 image tower against fp32 (min over probes)
PROBE_COUNT = 12  # generated images for the int8 load-time check (half calibrate the smoothing)


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
