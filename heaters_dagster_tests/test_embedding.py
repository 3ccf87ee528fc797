"""CLIP embedding: real open_clip models with random (seeded) weights, generated images.

ViT-B-32 (the production architecture) is loaded twice per session (default precision, fp32);
everything that does not need the real architecture uses the 64-d ``heaters-tiny-vit``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heaters_dagster.errors import InvalidMediaError, PermanentError
from heaters_dagster.media.embedding import embedder as embedder_mod
from heaters_dagster.media.embedding import quantize as quantize_mod
from heaters_dagster.media.embedding import weights as weights_mod
from heaters_dagster.media.embedding import (
    STRATEGIES,
    TINY_MODEL_NAME,
    ClipEmbedder,
    EmbeddingModelSpec,
    EmbeddingResult,
    aggregate,
    embed_clip_keyframes,
)

VIT = EmbeddingModelSpec(model_name="ViT-B-32", pretrained=None)  # default precision
VIT_FP32 = EmbeddingModelSpec(model_name="ViT-B-32", pretrained=None, precision="fp32", batch_size=4)
TINY = EmbeddingModelSpec(model_name=TINY_MODEL_NAME, pretrained=None, precision="fp32", batch_size=4)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit() -> ClipEmbedder:
    return ClipEmbedder.load(VIT)


@pytest.fixture(scope="module")
def vit_fp32() -> ClipEmbedder:
    return ClipEmbedder.load(VIT_FP32)


@pytest.fixture(scope="module")
def tiny() -> ClipEmbedder:
    return ClipEmbedder.load(TINY)


def pattern(kind: int, w: int = 480, h: int = 270, seed: int = 0) -> np.ndarray:
    """Clearly different generated pictures (uint8 HxWx3)."""
    rng = np.random.default_rng(seed + 97 * kind)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx /= w
    yy /= h
    k = kind % 8
    if k == 0:  # red/green gradient
        img = np.stack([xx * 255, yy * 255, np.full_like(xx, 40)], -1)
    elif k == 1:  # blue vertical stripes
        s = (np.sin(xx * 40) > 0).astype(np.float32)
        img = np.stack([s * 30, s * 60, s * 250], -1)
    elif k == 2:  # yellow disc on dark
        img = np.zeros((h, w, 3), np.float32) + 20
        img[((xx - 0.5) * w / h) ** 2 + (yy - 0.5) ** 2 < 0.12] = (240, 220, 30)
    elif k == 3:  # checkerboard
        c = ((xx * 12).astype(int) + (yy * 7).astype(int)) % 2
        img = np.stack([c * 255] * 3, -1).astype(np.float32)
    elif k == 4:  # noise
        img = rng.uniform(0, 255, (h, w, 3))
    elif k == 5:  # flat magenta
        img = np.zeros((h, w, 3), np.float32) + (200, 30, 190)
    elif k == 6:  # horizontal bands of colours
        img = np.zeros((h, w, 3), np.float32)
        for i in range(6):
            img[i * h // 6 : (i + 1) * h // 6] = rng.uniform(0, 255, 3)
    else:  # diagonal sine, grey
        v = np.sin((xx + yy) * 25) * 0.5 + 0.5
        img = np.stack([v * 255] * 3, -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_jpeg(arr: np.ndarray, path: Path, quality: int = 92) -> Path:
    Image.fromarray(arr, "RGB").save(path, "JPEG", quality=quality)
    return path


def reference_transform(embedder: ClipEmbedder):
    """open_clip's own eval transform for the embedder's model (what a naive loop uses)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    oc = weights_mod._open_clip()
    return image_transform_v2(PreprocessCfg(**oc.get_model_preprocess_cfg(embedder.model)), is_train=False)


def reference_vectors(embedder: ClipEmbedder, images) -> np.ndarray:
    """open_clip's preprocess per image + fp32 ``encode_image`` of the embedder's fp32 model (one
    forward for all images; batching itself is checked against batch-of-one separately)."""
    pre = reference_transform(embedder)
    opened = [Image.open(im) if isinstance(im, (str, Path)) else im for im in images]
    with torch.no_grad():
        f = embedder.model.encode_image(torch.stack([pre(im) for im in opened]))
    return torch.nn.functional.normalize(f, dim=-1).numpy()


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1)


# ---------------------------------------------------------------------------------------------
# ViT-B-32 (real architecture, random weights)
# ---------------------------------------------------------------------------------------------


def test_vit_b32_dimension_and_unit_norm(vit, tmp_path):
    assert vit.dim == 512
    assert vit.model_id == "ViT-B-32/random"
    assert vit.device == "cpu"
    paths = [save_jpeg(pattern(k), tmp_path / f"{k}.jpg") for k in range(4)]
    inputs = [paths[0], str(paths[1]), Image.open(paths[2]), Image.fromarray(pattern(3)).convert("L")]
    v = vit.embed_images(inputs)
    assert v.shape == (4, 512)
    assert v.dtype == np.float32
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert vit.embed_images([]).shape == (0, 512)


def test_default_precision_agrees_with_naive_fp32_open_clip_loop(vit, tmp_path):
    """The default (fast) path must stay in the fp32 model's vector space: cosine >= 0.99 per
    image against the naive per-image open_clip fp32 loop on the same weights."""
    if vit.precision == "int8":
        assert vit.precision_check is not None and vit.precision_check["min_cosine"] >= quantize_mod.INT8_MIN_COSINE
    paths = [save_jpeg(pattern(k, seed=3), tmp_path / f"{k}.jpg") for k in range(0, 8, 2)]
    fast = vit.embed_images(paths)
    ref = reference_vectors(vit, paths)  # vit.model is the fp32 model with the same seeded weights
    c = cos(fast, ref)
    assert c.min() >= 0.99, c


def test_random_weights_are_the_same_in_every_load(tiny):
    """'<model>/random' names one vector space: the init is open_clip's after
    torch.manual_seed(RANDOM_INIT_SEED), in every load, and the caller's RNG is left alone."""
    torch.manual_seed(42)
    expected_next = torch.rand(3)
    torch.manual_seed(42)
    again = ClipEmbedder._load_uncached(TINY)  # loading must not consume the caller's RNG
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(weights_mod.RANDOM_INIT_SEED)
    plain, _, _ = weights_mod._open_clip().create_model_and_transforms(TINY_MODEL_NAME, pretrained=None)
    plain_sd = plain.state_dict()
    for (n1, p1), (n2, p2) in zip(again.model.state_dict().items(), tiny.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2) and torch.equal(p1, plain_sd[n1]), n1


def test_batching_matches_one_at_a_time(vit_fp32, tmp_path):
    paths = [save_jpeg(pattern(k, seed=5), tmp_path / f"{k}.jpg") for k in range(5)]  # batches of 4 + 1
    assert vit_fp32.spec.batch_size == 4
    batched = vit_fp32.embed_images(paths)
    single = np.concatenate([vit_fp32.embed_images([p]) for p in paths])
    c = cos(batched, single)
    assert c.min() > 0.999, c
    assert cos(batched[:, None, :], batched[None, :, :]).min() < 0.999  # the images do differ


@pytest.mark.parametrize(
    "size, mode",
    [((480, 270), "RGB"), ((270, 480), "RGB"), ((224, 224), "RGB"), ((300, 301), "RGBA"), ((90, 50), "L")],
)
def test_fast_preprocessing_equals_open_clip_transform(vit_fp32, size, mode):
    # (palette images differ on purpose: open_clip resizes them before converting to RGB, which
    # PIL does with nearest-neighbour; we convert first)
    arr = pattern(size[0] % 8, w=size[0], h=size[1])
    im = Image.fromarray(arr, "RGB").convert(mode)
    ours = vit_fp32._to_batch([vit_fp32._prepare(im)])[0]
    theirs = reference_transform(vit_fp32)(im)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert torch.max(torch.abs(ours - theirs)).item() < 1e-5


def test_large_jpeg_decoded_in_draft_mode_still_agrees(vit_fp32, tmp_path):
    """A 1920x1080 JPEG is decoded at reduced size by libjpeg; the vector must still match the
    full-resolution open_clip path."""
    yy, xx = np.mgrid[0:1080, 0:1920].astype(np.float32)
    big = np.stack([xx / 1920 * 255, (np.sin(yy / 40) * 0.5 + 0.5) * 255, ((xx + yy) % 256)], -1)
    big[300:700, 500:1200] = (20, 200, 90)
    path = save_jpeg(big.astype(np.uint8), tmp_path / "big.jpg")
    decoded = vit_fp32._open(path)
    assert decoded.size[0] < 1920  # draft mode really reduced the decode
    fast = vit_fp32.embed_images([path])
    ref = reference_vectors(vit_fp32, [path])
    assert cos(fast, ref)[0] > 0.99


def test_identical_image_is_its_own_nearest_neighbour(vit, tmp_path):
    arrays = [pattern(k, seed=11) for k in range(8)]
    files = [save_jpeg(a, tmp_path / f"g{k}.jpg") for k, a in enumerate(arrays)]
    gallery = vit.embed_images(files)
    # the same files again (copies), queried in a different order, so in a different batch
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    copies = []
    for k in order:
        copies.append(tmp_path / f"q{k}.jpg")
        copies[-1].write_bytes(files[k].read_bytes())
    queries = vit.embed_images(copies)
    sims = queries @ gallery.T
    for qi, k in enumerate(order):
        ranked = np.argsort(-sims[qi])
        assert ranked[0] == k, (k, sims[qi])
        assert sims[qi, k] > 0.99
        assert sims[qi, k] - sims[qi, ranked[1]] > 1e-3  # a real margin, not a tie


def test_text_embedding_unit_norm_and_distinct(vit):
    texts = ["a red square", "a dog running on the beach", "x"]
    t = vit.embed_text(texts)
    assert t.shape == (3, 512) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert np.max(np.abs(t[0] - t[1])) > 1e-3  # different texts, different vectors
    np.testing.assert_allclose(vit.embed_text(["a red square"])[0], t[0], atol=1e-5)  # deterministic
    assert vit.embed_text([]).shape == (0, 512)


def test_load_is_cached_per_spec(vit):
    assert ClipEmbedder.load(VIT) is vit
    assert ClipEmbedder.load(EmbeddingModelSpec(model_name="ViT-B-32", pretrained=None)) is vit


def _with_outlier_channels(visual, alpha: float = 100.0, seed: int = 0):
    """The same function (exact in fp32) with a few LayerNorm output channels ``alpha`` times
    larger and the next Linear's columns ``alpha`` times smaller: the activation outliers of
    trained CLIP towers, which break a single per-tensor int8 activation scale."""
    import copy

    v = copy.deepcopy(visual)
    g = torch.Generator().manual_seed(seed)
    width = v.transformer.resblocks[0].ln_1.weight.numel()
    with torch.no_grad():
        for blk in v.transformer.resblocks:
            c = torch.randperm(width, generator=g)[:3]
            blk.ln_1.weight[c] *= alpha
            blk.ln_1.bias[c] *= alpha
            blk.attn.in_proj_weight[:, c] /= alpha
            c = torch.randperm(width, generator=g)[:3]
            blk.ln_2.weight[c] *= alpha
            blk.ln_2.bias[c] *= alpha
            blk.mlp.c_fc.weight[:, c] /= alpha
    return v


def test_int8_smoothing_survives_activation_outliers(tiny):
    x = tiny._to_batch([tiny._prepare(im) for im in quantize_mod.probe_images(64, 16)])
    outlier = _with_outlier_channels(tiny.model.visual)
    ref = tiny._run_tower(outlier, x, "fp32")
    assert cos(ref, tiny._run_tower(tiny.model.visual, x, "fp32")).min() > 0.9999  # same function
    plain = tiny._run_tower(quantize_mod.quantize_image_tower(outlier), x, "int8")
    smoothed = tiny._run_tower(quantize_mod.quantize_image_tower(outlier, calib=x[:8]), x, "int8")
    assert cos(ref, plain).min() < 0.99  # the hazard is real ...
    assert cos(ref, smoothed).min() > 0.995  # ... and smoothing removes it (on unseen images too)


def test_int8_embedder_on_outlier_checkpoint_agrees_with_fp32(tiny, tmp_path):
    model = copy_with_visual(tiny.model, _with_outlier_channels(tiny.model.visual))
    ckpt = tmp_path / "outliers.pt"
    torch.save(model.state_dict(), ckpt)
    fp32 = ClipEmbedder._load_uncached(
        EmbeddingModelSpec(model_name=TINY_MODEL_NAME, checkpoint_path=str(ckpt), precision="fp32")
    )
    int8 = ClipEmbedder._load_uncached(
        EmbeddingModelSpec(model_name=TINY_MODEL_NAME, checkpoint_path=str(ckpt), precision="int8")
    )
    assert int8.precision == "int8" and int8.precision_check["min_cosine"] >= quantize_mod.INT8_MIN_COSINE
    images = [Image.fromarray(pattern(k, w=320, h=180, seed=7)) for k in range(8)]
    assert cos(fp32.embed_images(images), int8.embed_images(images)).min() > 0.99


def copy_with_visual(model, visual):
    import copy

    m = copy.deepcopy(model)
    m.visual = visual
    return m


def test_int8_falls_back_to_fp32_when_the_check_fails(monkeypatch, caplog):
    monkeypatch.setattr(quantize_mod, "INT8_MIN_COSINE", 1.5)  # no int8 tower can pass this
    with caplog.at_level("WARNING", logger=embedder_mod.__name__):
        e = ClipEmbedder._load_uncached(
            EmbeddingModelSpec(model_name=TINY_MODEL_NAME, pretrained=None, precision="int8")
        )
    assert e.precision == "fp32"
    assert e.image_tower is e.model.visual
    assert "using fp32" in caplog.text
    v = e.embed_images([Image.fromarray(pattern(1, w=100, h=100))])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def _unit_rows(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_aggregate_multi_avg_is_normalised_mean():
    v = _unit_rows(3)
    got = aggregate(v, ["25pct", "mid", "75pct"], "keyframe_multi_avg")
    expected = v.mean(axis=0) / np.linalg.norm(v.mean(axis=0))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.dtype == np.float32
    assert abs(np.linalg.norm(got) - 1) < 1e-6
    assert not np.allclose(got, v[1], atol=1e-3)  # not just the middle vector


def test_aggregate_midpoint_picks_mid_vector():
    v = _unit_rows(3, seed=1)
    np.testing.assert_allclose(aggregate(v, ["start", "mid", "end"], "keyframe_midpoint"), v[1], atol=1e-6)
    np.testing.assert_allclose(
        aggregate(v, ["25pct", "75pct", "50pct"], "keyframe_midpoint"), v[2], atol=1e-6
    )
    # 'mid' wins over '50pct' when both are there
    np.testing.assert_allclose(aggregate(v, ["50pct", "x", "mid"], "keyframe_midpoint"), v[2], atol=1e-6)


@pytest.mark.parametrize(
    "vectors, tags, strategy, match",
    [
        (_unit_rows(2), ["a", "b"], "keyframe_median", "unknown embedding strategy"),
        (_unit_rows(2), ["start", "end"], "keyframe_midpoint", "'mid' or '50pct'"),
        (_unit_rows(2), ["mid"], "keyframe_multi_avg", "tags for 2"),
        (np.zeros((0, 16), np.float32), [], "keyframe_multi_avg", "non-empty"),
        (np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32), ["a", "b"], "keyframe_multi_avg", "norm"),
        (np.array([[np.nan, 0.0]], np.float32), ["mid"], "keyframe_midpoint", "NaN"),
    ],
)
def test_aggregate_errors(vectors, tags, strategy, match):
    with pytest.raises(PermanentError, match=match):
        aggregate(vectors, tags, strategy)


def test_strategies_constant():
    assert STRATEGIES == ("keyframe_multi_avg", "keyframe_midpoint")


# ---------------------------------------------------------------------------------------------
# many clips in shared batches
# ---------------------------------------------------------------------------------------------


def _clips(tmp_path: Path) -> dict[int, list[tuple[str, Path]]]:
    clips = {}
    k = 0
    for clip_id, n in ((10, 3), (11, 3), (12, 2), (13, 1)):
        tags = ["25pct", "mid", "75pct"][:n] if n > 1 else ["mid"]
        if clip_id == 12:
            tags = ["start", "50pct"]
        kfs = []
        for t in tags:
            kfs.append(
                (t, save_jpeg(pattern(k, w=160, h=90, seed=clip_id), tmp_path / f"c{clip_id}_{t}.jpg"))
            )
            k += 1
        clips[clip_id] = kfs
    return clips


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_embed_clip_keyframes_shares_batches_and_matches_per_clip(tiny, tmp_path, monkeypatch, strategy):
    clips = _clips(tmp_path)
    calls = []
    real = ClipEmbedder._embed_images_collecting

    def spy(self, images):
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(ClipEmbedder, "_embed_images_collecting", spy)
    results = embed_clip_keyframes(tiny, clips, strategy)
    assert len(calls) == 1  # one pass over all clips' keyframes
    expected_images = 9 if strategy == "keyframe_multi_avg" else 4
    assert calls[0] == expected_images
    assert sorted(results) == [10, 11, 12, 13]
    for clip_id, kfs in clips.items():
        r = results[clip_id]
        assert isinstance(r, EmbeddingResult)
        assert (r.model_id, r.strategy, r.dim) == (f"{TINY_MODEL_NAME}/random", strategy, 64)
        assert r.vector.shape == (64,) and r.vector.dtype == np.float32
        own = tiny.embed_images([p for _, p in kfs])  # this clip alone
        expected = aggregate(own, [t for t, _ in kfs], strategy)
        np.testing.assert_allclose(r.vector, expected, atol=1e-5)
        assert r.keyframe_count == (len(kfs) if strategy == "keyframe_multi_avg" else 1)


def test_embed_clip_keyframes_failures(tiny, tmp_path):
    clips = _clips(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    clips[20] = [("mid", broken)]
    clips[21] = [("start", clips[10][0][1]), ("end", clips[10][2][1])]  # no mid tag
    clips[22] = []
    clips[23] = [("mid", tmp_path / "missing.jpg")]

    errors: dict[int, BaseException] = {}
    results = embed_clip_keyframes(tiny, clips, "keyframe_midpoint", errors=errors)
    assert sorted(results) == [10, 11, 12, 13]  # the good clips still get their vectors
    assert sorted(errors) == [20, 21, 22, 23]
    assert isinstance(errors[20], InvalidMediaError) and "broken.jpg" in str(errors[20])
    assert "'mid' or '50pct'" in str(errors[21])
    assert "no keyframes" in str(errors[22])
    assert isinstance(errors[23], InvalidMediaError) and "missing.jpg" in str(errors[23])
    # multi_avg does not need a mid tag
    errors = {}
    results = embed_clip_keyframes(tiny, {21: clips[21]}, "keyframe_multi_avg", errors=errors)
    assert list(results) == [21] and not errors

    with pytest.raises(InvalidMediaError, match="broken.jpg"):
        embed_clip_keyframes(tiny, {10: clips[10], 20: clips[20]}, "keyframe_multi_avg")
    with pytest.raises(PermanentError, match="unknown embedding strategy"):
        embed_clip_keyframes(tiny, clips, "keyframe_everything")
    with pytest.raises(InvalidMediaError, match="missing.jpg"):
        tiny.embed_images([clips[10][0][1], tmp_path / "missing.jpg"])


# ---------------------------------------------------------------------------------------------
# weights: local checkpoint, cache, offline
# ---------------------------------------------------------------------------------------------


def _other_tiny_model():
    """A heaters-tiny-vit with weights different from the seeded default init."""
    oc = weights_mod._open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model, _, pre = oc.create_model_and_transforms(TINY_MODEL_NAME, pretrained=None)
    model.eval()
    return model, pre


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_checkpoint_path_loads_those_weights(tiny, tmp_path, fmt):
    model, pre = _other_tiny_model()
    ckpt = tmp_path / f"tiny.{fmt}"
    if fmt == "pt":
        torch.save(model.state_dict(), ckpt)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    spec = EmbeddingModelSpec(
        model_name=TINY_MODEL_NAME, pretrained=None, checkpoint_path=str(ckpt), precision="fp32"
    )
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert spec.model_id == f"{TINY_MODEL_NAME}/ckpt:{sha[:16]}"
    loaded = ClipEmbedder.load(spec)
    assert loaded.model_id == spec.model_id

    images = [Image.fromarray(pattern(k, w=200, h=120)) for k in range(3)]
    got = loaded.embed_images(images)
    with torch.no_grad():
        want = torch.nn.functional.normalize(
            model.encode_image(torch.stack([pre(i) for i in images])), dim=-1
        ).numpy()
        want_text = torch.nn.functional.normalize(
            model.encode_text(weights_mod._open_clip().get_tokenizer(TINY_MODEL_NAME)(["a cat", "a car"])), dim=-1
        ).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(loaded.embed_text(["a cat", "a car"]), want_text, atol=1e-5)
    # and they are not the seeded default weights
    assert cos(got, tiny.embed_images(images)).max() < 0.999


def test_missing_checkpoint_file_is_permanent(tmp_path):
    spec = EmbeddingModelSpec(model_name=TINY_MODEL_NAME, checkpoint_path=str(tmp_path / "nope.pt"))
    with pytest.raises(PermanentError, match="does not exist"):
        ClipEmbedder.load(spec)
    bad = tmp_path / "bad.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(PermanentError, match="could not load"):
        ClipEmbedder.load(EmbeddingModelSpec(model_name=TINY_MODEL_NAME, checkpoint_path=str(bad)))


def test_missing_named_weights_offline_raise_actionable_permanent_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HEATERS_MODEL_CACHE", str(empty))
    spec = EmbeddingModelSpec(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert spec.model_id == "ViT-B-32/laion2b_s34b_b79k"
    with pytest.raises(PermanentError) as ei:
        ClipEmbedder.load(spec)
    msg = str(ei.value)
    for needle in (
        "ViT-B-32/laion2b_s34b_b79k",
        str(empty),
        "HF_HUB_OFFLINE",
        "checkpoint_path",
        "HEATERS_MODEL_CACHE",
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    ):
        assert needle in msg, needle
    assert spec not in embedder_mod._LOADED


def test_named_weights_found_in_prepopulated_hf_cache_offline(tiny, tmp_path, monkeypatch):
    """A pre-populated Hugging Face cache (hub layout) is used without any network access."""
    import open_clip.pretrained as ocp

    model, _ = _other_tiny_model()
    repo, rev = "heaters-test/tiny-vit", "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf" / "hub"
    snap = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / rev
    snap.mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(rev)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "open_clip_model.safetensors")
    )
    monkeypatch.setitem(ocp._PRETRAINED, TINY_MODEL_NAME, {"testtag": ocp._pcfg(hf_hub=f"{repo}/")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HEATERS_MODEL_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # -> HF_HOME/hub
    spec = EmbeddingModelSpec(model_name=TINY_MODEL_NAME, pretrained="testtag", precision="fp32")
    try:
        loaded = ClipEmbedder.load(spec)
        assert loaded.model_id == f"{TINY_MODEL_NAME}/testtag"
        sd = model.state_dict()
        for name, p in loaded.model.state_dict().items():
            assert torch.equal(p, sd[name]), name
    finally:
        embedder_mod._LOADED.pop(spec, None)


# ---------------------------------------------------------------------------------------------
# spec
# ---------------------------------------------------------------------------------------------


def test_spec_validation_and_model_ids(tmp_path):
    assert EmbeddingModelSpec().model_id == "ViT-B-32/laion2b_s34b_b79k"
    assert EmbeddingModelSpec(pretrained="LAION2B-S34B-B79K").model_id == "ViT-B-32/laion2b_s34b_b79k"
    assert EmbeddingModelSpec(pretrained=None).model_id == "ViT-B-32/random"
    # model_id names the weights, not how they run
    assert EmbeddingModelSpec(precision="fp32", batch_size=8).model_id == EmbeddingModelSpec().model_id
    with pytest.raises(PermanentError, match="precision"):
        EmbeddingModelSpec(precision="int4")
    with pytest.raises(PermanentError, match="batch_size"):
        EmbeddingModelSpec(batch_size=0)
    with pytest.raises(PermanentError, match="device"):
        EmbeddingModelSpec(device="tpu")
    with pytest.raises(PermanentError, match="unknown CLIP architecture"):
        ClipEmbedder.load(EmbeddingModelSpec(model_name="ViT-Q-99", pretrained=None))
    with pytest.raises(PermanentError, match="known tags"):
        ClipEmbedder.load(EmbeddingModelSpec(model_name=TINY_MODEL_NAME, pretrained="no-such-tag"))
    if not torch.cuda.is_available():
        with pytest.raises(PermanentError, match="CUDA"):
            ClipEmbedder.load(EmbeddingModelSpec(model_name=TINY_MODEL_NAME, pretrained=None, device="cuda"))
