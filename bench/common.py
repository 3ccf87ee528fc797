"""What every benchmark shares: figures with a baseline and a target, the results files, charts.

A benchmark is a module ``bench/bench_<name>.py`` with

* ``NAME`` (str) and ``DESCRIPTION`` (one line);
* ``run(smoke: bool, out_dir: Path) -> dict``: measures, returns its result document (JSON-able),
  with ``"figures"``: a list of :class:`Figure` dicts (see :func:`figure`);
* optionally ``summarize(doc: dict) -> list[dict]``: the figures of a result document written by an
  older version of the script (so ``heaters bench --report`` can redraw them without re-running).

``heaters bench`` (heaters_dagster/cli/bench.py) runs them and calls :func:`write_results`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache"


def figure(name: str, value: float | None, unit: str, *, target: float | None = None, kind: str = "max",
           baseline: float | None = None, baseline_name: str = "", note: str = "") -> dict[str, Any]:
    """One measured figure. ``kind`` says which side of ``target`` is good: ``max`` (the value
    must be at most the target) or ``min`` (at least). ``met`` is None without a target."""
    met = None
    if target is not None and value is not None:
        met = bool(value <= target) if kind == "max" else bool(value >= target)
    elif target is not None:
        met = False
    return {"name": name, "value": None if value is None else round(float(value), 4), "unit": unit,
            "baseline": None if baseline is None else round(float(baseline), 4), "baseline_name": baseline_name,
            "target": target, "kind": kind, "met": met, "note": note}


def host_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def missed(figures: Iterable[dict]) -> list[dict]:
    return [f for f in figures if f.get("met") is False]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def verdict(f: dict) -> str:
    if f.get("met") is None:
        return "-"
    return "met" if f["met"] else "**MISSED**"


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)


def chart(path: Path, name: str, figures: list[dict]) -> Path | None:
    """A PNG: one panel per figure, its value against its baseline (bars) and its target (a line)."""
    figs = [f for f in figures if f.get("value") is not None]
    if not figs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(figs)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, f in zip(axes.flat, figs):
        labels, values, colours = ["measured"], [f["value"]], []
        colours.append({True: "#2a9d4b", False: "#d33c2f", None: "#4a78b5"}[f.get("met")])
        if f.get("baseline") is not None:
            labels.append(f.get("baseline_name") or "baseline")
            values.append(f["baseline"])
            colours.append("#9a9a9a")
        ax.barh(labels, values, color=colours)
        if f.get("target") is not None:
            ax.axvline(f["target"], color="#222", linestyle="--", linewidth=1.2,
                       label=f"target {'<=' if f['kind'] == 'max' else '>='} {_fmt(f['target'])}")
            ax.legend(loc="lower right", fontsize=7, frameon=False)
        ax.set_title(f"{f['name']} ({f['unit']}): {verdict(f).strip('*')}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"bench: {name}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_markdown(docs: dict[str, dict]) -> str:
    """bench/results/README.md: one table per benchmark, every figure with baseline, target and
    whether it was met."""
    lines = ["# Benchmark results", "",
             "Written by `heaters bench` (see bench/README.md for what each benchmark measures). "
             "A figure's *baseline* is measured in the same run; *target* is the issue's goal.", ""]
    all_missed = []
    for name, doc in docs.items():
        figs = doc.get("figures") or []
        host = doc.get("host") or {}
        lines += [f"## {name}" + (" (smoke size)" if doc.get("smoke") else ""), "",
                  f"{doc.get('description', '')}  ",
                  f"Run {doc.get('generated_at', '?')} on {host.get('cpus', '?')} CPUs "
                  f"({host.get('cpu', '?')}), load average {host.get('loadavg', '?')}. "
                  f"Data: [`{name}.json`]({name}.json), chart: [`{name}.png`]({name}.png).", "",
                  "| figure | value | baseline | target | |", "|---|---|---|---|---|"]
        for f in figs:
            base = f"{_fmt(f['baseline'])} ({f['baseline_name']})" if f.get("baseline") is not None else "-"
            tgt = f"{'<=' if f['kind'] == 'max' else '>='} {_fmt(f['target'])}" if f.get("target") is not None else "-"
            lines.append(f"| {f['name']} | {_fmt(f['value'])} {f['unit']} | {base} | {tgt} | {verdict(f)} |")
            if f.get("met") is False:
                all_missed.append(f"{name}: {f['name']}")
        notes = [f"- {f['name']}: {f['note']}" for f in figs if f.get("note")]
        if notes:
            lines += ["", *notes]
        lines.append("")
    lines += ["## Targets missed", ""]
    lines += [f"- {m}" for m in all_missed] or ["none"]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, docs: dict[str, dict]) -> None:
    """Write ``<name>.json`` and ``<name>.png`` for each document, and README.md over every
    ``*.json`` in out_dir that has figures (so one benchmark's rerun keeps the others' rows)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in docs.items():
        write_json(out_dir / f"{name}.json", doc)
        chart(out_dir / f"{name}.png", name, doc.get("figures") or [])
    every: dict[str, dict] = {}
    for p in sorted(out_dir.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("figures"):
            every[p.stem] = doc
    (out_dir / "README.md").write_text(summary_markdown(every))


def run_script(script: str, args: list[str], out_dir: Path, name: str, timeout: float | None = None) -> dict:
    """Run one of the argparse benchmark scripts (``python bench/<script> ARGS --out FILE``) in a
    fresh process and return the JSON document it wrote (the process's own ``ru_maxrss`` stays its
    own). Raises RuntimeError with the output's tail if it fails."""
    import subprocess
    import sys

    out = Path(out_dir) / f".{name}.raw.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{script} failed with exit status {proc.returncode}:\n{tail}")
    doc = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    doc["log_tail"] = proc.stdout.splitlines()[-40:]
    return doc
