"""``heaters bench``: run the benchmarks in ``bench/`` (all, or some by name) and write their
results: ``<name>.json``, ``<name>.png`` and the summary ``README.md`` in bench/results/ (or
``--out``). Each benchmark is a module ``bench/bench_<name>.py`` with ``NAME``, ``DESCRIPTION`` and
``run(smoke, out_dir) -> dict`` (see bench/common.py). ``--smoke`` runs tiny sizes (CI) and never
writes to bench/results/ unless ``--out`` says so.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

import click

ORDER = ("e2e", "sensor", "splice", "scenes", "embedding", "search", "celery_scale")


def bench_dir() -> Path:
    from heaters_dagster.settings import project_root

    d = project_root() / "bench"
    if not (d / "common.py").is_file():
        raise click.ClickException(f"no benchmarks at {d}: run `heaters bench` from a Heaters checkout")
    return d


def _modules() -> dict[str, Path]:
    found = {p.stem.removeprefix("bench_"): p for p in sorted(bench_dir().glob("bench_*.py"))}
    return {n: found[n] for n in (*[o for o in ORDER if o in found], *sorted(set(found) - set(ORDER)))}


def load(name: str) -> ModuleType:
    d = bench_dir()
    for p in (str(d.parent), str(d)):
        if p not in sys.path:
            sys.path.insert(0, p)
    mod = importlib.import_module(f"bench_{name}")
    if not callable(getattr(mod, "run", None)):
        raise click.ClickException(f"bench/bench_{name}.py has no run(smoke, out_dir) function")
    return mod


def _description(path: Path) -> str:
    import ast

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DESCRIPTION" for t in node.targets):
            try:
                return str(ast.literal_eval(node.value))
            except ValueError:
                break
    return ""


@click.command("bench")
@click.argument("names", nargs=-1)
@click.option("--smoke", is_flag=True, help="Tiny sizes (what CI runs); results go to a temporary folder "
              "unless --out is given.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the results (default: bench/results/; with --smoke a temporary folder).")
@click.option("--report", is_flag=True, help="Only redraw the charts and README.md from the JSON files there.")
def bench_cmd(names: tuple[str, ...], smoke: bool, list_only: bool, out_dir: Path | None, report: bool) -> None:
    """Run every benchmark, or the ones NAMED (e2e, sensor, splice, scenes, embedding, search, celery_scale), and write
    bench/results/<name>.json, <name>.png and README.md. Exit status 1 when a target is missed or a
    benchmark fails."""
    mods = _modules()
    if list_only:
        for n, p in mods.items():
            click.echo(f"{n:<10} {_description(p)}")
        return
    unknown = [n for n in names if n not in mods]
    if unknown:
        raise click.BadParameter(f"unknown benchmark {', '.join(unknown)}; benchmarks: {', '.join(mods)}",
                                 param_hint="NAMES")
    chosen = list(names) or list(mods)
    out = out_dir or (Path(tempfile.mkdtemp(prefix="heaters-bench-smoke-")) if smoke else bench_dir() / "results")
    common = load_common()
    docs: dict[str, dict] = {}
    failed: list[str] = []
    if report:
        import json

        for n in chosen:
            p = out / f"{n}.json"
            if not p.exists():
                continue
            doc = json.loads(p.read_text())
            mod = load(n)
            if hasattr(mod, "summarize"):
                doc["figures"] = mod.summarize(doc)
            doc.setdefault("description", getattr(mod, "DESCRIPTION", ""))
            docs[n] = doc
    else:
        for n in chosen:
            click.echo(f"== bench {n}{' (smoke)' if smoke else ''}", err=True)
            t0 = time.perf_counter()
            try:
                mod = load(n)
                doc = mod.run(smoke, out)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the others
                failed.append(n)
                click.echo(f"bench {n} FAILED: {exc}", err=True)
                click.echo("".join(traceback.format_exception(exc))[-3000:], err=True)
                continue
            doc.setdefault("description", getattr(mod, "DESCRIPTION", ""))
            doc["smoke"] = smoke
            doc["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            docs[n] = doc
            common.write_results(out, {n: doc})
    common.write_results(out, docs)
    missed = []
    for n, doc in docs.items():
        for f in doc.get("figures") or []:
            mark = {True: "met", False: "MISSED", None: "-"}[f.get("met")]
            tgt = "" if f.get("target") is None else f" (target {'<=' if f['kind'] == 'max' else '>='} {f['target']})"
            base = "" if f.get("baseline") is None else f" vs {f['baseline']} {f['baseline_name']}"
            click.echo(f"{n}: {f['name']}: {f['value']} {f['unit']}{base}{tgt} {mark}")
            if f.get("met") is False:
                missed.append(f"{n}: {f['name']}")
    click.echo(f"results in {out}")
    for m in missed:
        click.echo(f"TARGET MISSED: {m}")
    for n in failed:
        click.echo(f"BENCHMARK FAILED: {n}")
    if missed or failed:
        sys.exit(1)


def load_common() -> ModuleType:
    """bench/common.py (the results writer the benchmarks share)."""
    d = str(bench_dir())
    if d not in sys.path:
        sys.path.insert(0, d)
    return importlib.import_module("common")
