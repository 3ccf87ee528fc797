"""A faster inference pass of TransNetV2, with the package's own trained weights.

The package's ``forward`` is written for training parity: every 3D convolution, batch norm and
average pool runs as its own fp32 operator. For inference on a CPU the same function can be
computed with less work:

* each batch norm (after the four dilated branches are concatenated) is folded into the
  branches' temporal convolutions (scale into the weights, shift into a bias);
* the convolutions run in bfloat16 where the CPU does bfloat16 natively (AVX-512 BF16 or AMX;
  :func:`bf16_supported`), else in fp32;
* the 1x2x2 average pools are four strided adds (``avg_pool3d`` has no bfloat16 kernel and is
  slow in fp32);
* the heads (frame similarity, colour histograms, the dense layers) are the package's own
  modules, in fp32.

The outputs equal the package's ``predict_raw`` to within about 1e-5 in fp32 and a few 1e-3 in
bfloat16 (``test_scenes_hybrid`` checks both on real frames). :func:`prepare` builds the folded
weights once per loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "bf16", "fp32")


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (AVX-512 BF16 or AMX)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """``"bf16"`` or ``"fp32"`` for a requested ``precision`` (``auto``: bf16 where native)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


@dataclass(frozen=True)
class _Branch:
    spatial: Any  # (2F, C_in, 1, 3, 3)
    temporal: Any  # (F, 2F, 3, 1, 1), batch-norm scale folded in
    bias: Any  # (F,), batch-norm shift
    dilation: int


@dataclass(frozen=True)
class Prepared:
    precision: str
    blocks: tuple[tuple[tuple[tuple[_Branch, ...], bool], ...], ...]  # block -> layer -> (branches, relu)


def prepare(model: Any, precision: str = "auto") -> Prepared:
    """Folded weights of a loaded ``TransNetV2`` for :func:`predict`."""
    import torch

    precision = resolve_precision(precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    blocks = []
    with torch.no_grad():
        for block in model.SDDCNN:
            layers = []
            for layer in block.DDCNN:
                bn = layer.bn
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias - bn.running_mean * scale
                branches = []
                for k, conv in enumerate((layer.Conv3D_1, layer.Conv3D_2, layer.Conv3D_4, layer.Conv3D_8)):
                    spatial, temporal = conv.layers
                    f = temporal.weight.shape[0]
                    sl = slice(k * f, (k + 1) * f)
                    bias = shift[sl] if temporal.bias is None else shift[sl] + temporal.bias * scale[sl]
                    branches.append(_Branch(
                        spatial=spatial.weight.to(dtype).contiguous(),
                        temporal=(temporal.weight * scale[sl].view(-1, 1, 1, 1, 1)).to(dtype).contiguous(),
                        bias=bias.to(dtype).contiguous(), dilation=int(temporal.dilation[0])))
                layers.append((tuple(branches), layer.activation is not None))
            blocks.append(tuple(layers))
    return Prepared(precision=precision, blocks=tuple(blocks))


def _pool(x: Any) -> Any:
    """``AvgPool3d((1, 2, 2))`` (floor mode) as four strided adds."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return (x[..., 0:h:2, 0:w:2] + x[..., 1:h:2, 0:w:2] + x[..., 0:h:2, 1:w:2] + x[..., 1:h:2, 1:w:2]) * 0.25


def predict(model: Any, prepared: Prepared, frames: Any) -> tuple[Any, Any]:
    """``(single, many)`` probabilities, shape (B, T, 1) fp32, for uint8 ``frames`` (B, T, 27, 48, 3):
    the package's ``predict_raw`` (call under ``torch.inference_mode()``)."""
    import torch
    import torch.nn.functional as fn

    dtype = torch.bfloat16 if prepared.precision == "bf16" else torch.float32
    x = frames.permute(0, 4, 1, 2, 3).to(dtype).div_(255.0)
    features = []
    for layers in prepared.blocks:
        shortcut = None
        for branches, relu in layers:
            x = torch.cat([fn.conv3d(fn.conv3d(x, b.spatial, padding=(0, 1, 1)), b.temporal, b.bias,
                                     padding=(b.dilation, 0, 0), dilation=(b.dilation, 1, 1)) for b in branches], 1)
            if relu:
                x = fn.relu_(x)
            if shortcut is None:
                shortcut = x
        x = _pool(fn.relu(x) + shortcut)
        features.append(x.float())
    x = features[-1]
    x = x.permute(0, 2, 3, 4, 1).reshape(x.shape[0], x.shape[2], -1)
    x = torch.cat([model.frame_sim_layer(features), x], 2)
    x = torch.cat([model.color_hist_layer(frames), x], 2)
    x = fn.relu(model.fc1(x))
    return torch.sigmoid(model.cls_layer1(x)), torch.sigmoid(model.cls_layer2(x))
