"""Benchmark: CLIP keyframe embedding on CPU, naive open_clip loop vs ClipEmbedder.

Generates N JPEG keyframes (480x270 by default, varied generated content) and, in the same run
and on the same weights, measures images/second of

  naive   - the loop a first implementation would write: for each image, PIL open, open_clip's
            preprocess, ``model.encode_image`` on a batch of one, fp32, ``torch.no_grad``;
  <prec>  - ``ClipEmbedder.embed_images`` over all paths for each requested precision
            (default: the default spec, i.e. ``auto``, plus ``fp32`` to separate batching from
            quantisation),

plus the cosine agreement (mean / min over images) of each fast path with the naive fp32 vectors.
Weights are open_clip's seeded random init (no download possible here); their compute cost is the
same as trained weights'. Load time is reported separately and is not part of images/second.

Runs alternate (naive, fast, naive, fast, ...) for ``--repeats`` rounds so that a noisy shared
machine hurts both sides alike; the median round is reported. Writes bench/results/embedding.json.

    python bench/bench_embedding.py              # 256 images, ViT-B-32
    python bench/bench_embedding.py --n 64 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heaters_dagster.media.embedding import ClipEmbedder  # noqa: E402
from heaters_dagster.media.embedding.weights import (  # noqa: E402
    DEFAULT_PRECISION,
    RANDOM_INIT_SEED,
    EmbeddingModelSpec,
    _open_clip,
)

RESULTS = Path(__file__).resolve().parent / "results" / "embedding.json"


def make_images(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """N different JPEG keyframes: gradients, stripes, blobs, checkerboards, noise, mixes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx /= width
    yy /= height
    paths = []
    for i in range(n):
        base = rng.uniform(0, 255, 3).astype(np.float32)
        img = np.zeros((height, width, 3), np.float32) + base
        kind = i % 5
        if kind == 0:
            a, b = rng.uniform(-1, 1, 2)
            img += (a * xx + b * yy)[..., None] * rng.uniform(-200, 200, 3)
        elif kind == 1:
            f, ph = rng.uniform(3, 40), rng.uniform(0, 6.28)
            img += np.sin(xx * f + yy * rng.uniform(-20, 20) + ph)[..., None] * rng.uniform(-120, 120, 3)
        elif kind == 2:
            c = ((xx * rng.integers(2, 24)).astype(int) + (yy * rng.integers(2, 14)).astype(int)) % 2
            img = np.where(c[..., None] == 1, img, rng.uniform(0, 255, 3))
        elif kind == 3:
            img += rng.normal(0, rng.uniform(10, 80), img.shape)
        for _ in range(rng.integers(1, 8)):  # blobs on every kind
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.25)
            mask = ((xx - cx) * width / height) ** 2 + (yy - cy) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        p = folder / f"kf_{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def naive_model(model_name: str):
    import torch

    oc = _open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # the same random weights ClipEmbedder gets
        model, _, preprocess = oc.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    return model, preprocess


def naive_embed(model, preprocess, paths: list[Path]) -> np.ndarray:
    import torch

    rows = []
    with torch.no_grad():
        for p in paths:
            x = preprocess(Image.open(p)).unsqueeze(0)
            f = model.encode_image(x)
            rows.append(torch.nn.functional.normalize(f, dim=-1)[0].numpy())
    return np.stack(rows).astype(np.float32)


def cpu_info() -> dict:
    info = {"model": platform.processor() or "", "flags_avx512": [], "avx2": False}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and not info["model"]:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                info["flags_avx512"] = sorted(
                    f for f in flags if f.startswith("avx512") or f.startswith("amx")
                )
                info["avx2"] = "avx2" in flags
                break
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["has_avx512"] = bool([f for f in info["flags_avx512"] if f.startswith("avx512")])
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images (default 256)")
    ap.add_argument("--width", type=int, default=480)
    ap.add_argument("--height", type=int, default=270)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument(
        "--precisions", default="auto,fp32", help="ClipEmbedder precisions to time (first = default spec)"
    )
    ap.add_argument("--batch-size", type=int, default=EmbeddingModelSpec.batch_size)
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds; the median is reported")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both sides (default: the spec default, all cores); "
        "1 is steadier on a busy machine",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="heaters-bench-emb-") as tmp:
        paths = make_images(Path(tmp), args.n, args.width, args.height)

        t = time.perf_counter()
        model, preprocess = naive_model(args.model)
        naive_load_s = time.perf_counter() - t
        embedders = {}
        load_s = {}
        for prec in precisions:
            spec = EmbeddingModelSpec(
                model_name=args.model,
                pretrained=None,
                precision=prec,
                batch_size=args.batch_size,
                num_threads=args.threads,
            )
            t = time.perf_counter()
            embedders[prec] = ClipEmbedder.load(spec)
            load_s[prec] = time.perf_counter() - t
        if args.threads:
            torch.set_num_threads(args.threads)  # the naive loop uses the same thread count
        threads = torch.get_num_threads()

        # warm-up (allocators, oneDNN/fbgemm kernels) on a few images, not timed
        naive_embed(model, preprocess, paths[:4])
        for e in embedders.values():
            e.embed_images(paths[: min(len(paths), 2 * args.batch_size)])

        times: dict[str, list[float]] = {"naive": [], **{p: [] for p in precisions}}
        cpu_times: dict[str, list[float]] = {k: [] for k in times}
        vectors: dict[str, np.ndarray] = {}
        for r in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            vectors["naive"] = naive_embed(model, preprocess, paths)
            times["naive"].append(time.perf_counter() - t)
            cpu_times["naive"].append(time.process_time() - c)
            for prec, e in embedders.items():
                t, c = time.perf_counter(), time.process_time()
                vectors[prec] = e.embed_images(paths)
                times[prec].append(time.perf_counter() - t)
                cpu_times[prec].append(time.process_time() - c)
            print(
                f"round {r + 1}/{args.repeats}: "
                + ", ".join(f"{k} {args.n / v[-1]:.2f} img/s" for k, v in times.items()),
                flush=True,
            )

    load1 = os.getloadavg()
    naive_ips = args.n / statistics.median(times["naive"])
    rows = [
        {
            "variant": "naive open_clip loop (fp32, batch 1)",
            "key": "naive",
            "precision": "fp32",
            "batch_size": 1,
            "images_per_s": naive_ips,
            "speedup": 1.0,
            "cos_mean": 1.0,
            "cos_min": 1.0,
            "load_s": naive_load_s,
            "round_images_per_s": [args.n / x for x in times["naive"]],
            "cpu_ms_per_image": 1000 * statistics.median(cpu_times["naive"]) / args.n,
        }
    ]
    for i, (prec, e) in enumerate(embedders.items()):
        cos = np.sum(vectors["naive"] * vectors[prec], axis=1)
        ips = args.n / statistics.median(times[prec])
        rows.append(
            {
                "variant": f"ClipEmbedder precision={prec}"
                + (" (default spec)" if prec == DEFAULT_PRECISION else ""),
                "key": prec,
                "precision": e.precision,
                "batch_size": e.spec.batch_size,
                "images_per_s": ips,
                "speedup": ips / naive_ips,
                "cos_mean": float(cos.mean()),
                "cos_min": float(cos.min()),
                "load_s": load_s[prec],
                "load_time_check": e.precision_check,
                "round_images_per_s": [args.n / x for x in times[prec]],
                "cpu_ms_per_image": 1000 * statistics.median(cpu_times[prec]) / args.n,
            }
        )

    print()
    print(
        f"{'variant':48s} {'runs as':>7s} {'img/s':>8s} {'speedup':>8s} {'cos mean':>9s} {'cos min':>9s} "
        f"{'CPU ms/img':>10s} {'load s':>7s}"
    )
    for row in rows:
        print(
            f"{row['variant']:48s} {row['precision']:>7s} {row['images_per_s']:8.2f} {row['speedup']:7.2f}x "
            f"{row['cos_mean']:9.5f} {row['cos_min']:9.5f} "
            f"{row['cpu_ms_per_image']:10.1f} {row['load_s']:7.1f}"
        )
    cpu = cpu_info()
    print(
        f"\n{args.n} JPEG {args.width}x{args.height}, model {args.model} (random init), "
        f"torch {torch.__version__}, "
        f"{threads} threads, CPU {cpu['model']!r}, AVX-512: {'yes' if cpu['has_avx512'] else 'no'}, "
        f"load avg {load0[0]:.2f} -> {load1[0]:.2f}"
    )

    result = {
        "benchmark": "embedding",
        "images": args.n,
        "image_size": [args.width, args.height],
        "model": args.model,
        "weights": "random (seeded)",
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": threads,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "loadavg_start": load0,
        "loadavg_end": load1,
        "rows": rows,
        "default_speedup": rows[1]["speedup"] if len(rows) > 1 else None,
        "default_cos_min": rows[1]["cos_min"] if len(rows) > 1 else None,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- `heaters bench embedding` (bench/common.py) -------------------------------------------------
NAME = "embedding"
DESCRIPTION = ("CLIP image embedding on CPU: a naive per-image open_clip loop against ClipEmbedder's default "
               "(batched, int8) and fp32, same weights, same run; full: 256 images x 3 rounds, smoke: 8 images.")


def summarize(doc: dict) -> list[dict]:
    from common import figure

    rows = {r["key"]: r for r in doc["rows"]}
    naive = rows.get("naive", {})
    figs = []
    for key, r in rows.items():
        if key == "naive":
            continue
        figs.append(figure(f"{key} ({r['precision']}) images/s", r["images_per_s"], "img/s",
                           baseline=naive.get("images_per_s"), baseline_name="naive loop"))
        figs.append(figure(f"{key} ({r['precision']}) min cosine vs fp32", r["cos_min"], "", target=0.995, kind="min",
                           note="the load-time check falls back to fp32 under 0.995" if key == "auto" else ""))
    return figs


def run(smoke: bool, out_dir: Path) -> dict:
    from common import run_script

    args = ["--n", "8", "--repeats", "1"] if smoke else ["--repeats", "3"]
    doc = run_script("bench_embedding.py", args, out_dir, NAME)
    doc["figures"] = summarize(doc)
    return doc
