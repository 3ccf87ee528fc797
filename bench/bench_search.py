"""Benchmark: pgvector search (``heaters_dagster.search.search_vector``) on the embedded PostgreSQL.

In a temporary HEATERS_HOME it starts the embedded PostgreSQL + pgvector, applies the migrations,
bulk-loads (COPY) ``--n`` clips of ``--videos`` source videos in state ``embedded`` with one 512-d
L2-normalised vector each, builds the (model, dim) partial HNSW index through
``io_managers.embeddings.ensure_index`` (timed), and then, in the same run, for ``--queries`` query
vectors measures

  exact  - ``search_vector`` inside a transaction with ``SET LOCAL enable_indexscan = off`` (the
           same SQL, answered by a sequential scan: brute force in the database);
  hnsw   - ``search_vector(..., k=10)`` as the application calls it, for each ``--ef`` value;

p50/p95/p99 latency (client side, one transaction per query as ``DatabaseResource.session``
opens it), and recall@k against the exact top-k computed with numpy (float32, same vectors).
The same is done with a ``source_video_id`` filter on a video holding ~1% of the vectors, which
must still return k rows (iterative index scan): as the planner chooses, with the HNSW path forced
(``enable_sort = off``), and through a prototype exact per-video query (``exact_video_search``).
EXPLAIN (ANALYZE) of the captured SQL of a real ``search_vector`` call shows which plan it gets,
``pg_stat_user_indexes.idx_scan`` of the HNSW index is compared before/after every timed batch
(``idx scans`` = how many calls really scanned the index), and the plan a *generic* prepared plan
would get is checked too (partial-index predicate and LIMIT vs bound parameters).
``--alt-index 'm=16, ef_construction=200'`` then rebuilds the index with other options and
measures again. A fixed ``--seed`` fixes the data and queries, not the HNSW graph (its levels are
random and the build is parallel), so recall moves by a few points between runs.

Vectors are not uniform noise: a shared "mean" direction (CLIP embeddings are anisotropic),
``--clusters`` topic centres, scenes drawn around a topic, and clips drawn around their scene;
each video has a handful of topics, so neighbours are meaningful (near-duplicates from the same
scene, then the same topic). Queries: half are perturbed stored vectors, half fresh samples
(a new scene of a random topic, so no near-duplicate exists).

    python bench/bench_search.py               # 100,000 vectors (~4-6 min on 2 cores)
    python bench/bench_search.py --alt-index 'm=16, ef_construction=200'   # + ~1.5 min
    python bench/bench_search.py --n 20000     # quick run
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "search.json"
MODEL_ID = "bench/ViT-B-32"
STRATEGY = "keyframe_multi_avg"
DIM = 512


# --------------------------------------------------------------------------------------------
# data


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Corpus:
    """Hierarchical gaussian data on the sphere: mean direction -> topic -> scene -> clip."""

    def __init__(self, n: int, videos: int, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        mean_dir = _unit(rng.normal(size=DIM))
        # topic centres: pairwise cosine ~0.3 through the shared mean direction
        self.topics = _unit(0.65 * mean_dir + _unit(rng.normal(size=(clusters, DIM))))
        # per-topic spread of scenes around the topic, per-scene spread of clips around the scene
        self.topic_sigma = rng.uniform(0.025, 0.045, clusters).astype(np.float32)
        self.clip_sigma = 0.012
        # video sizes: lognormal around n/videos, summing to n exactly
        w = rng.lognormal(0.0, 0.5, videos)
        sizes = np.maximum(1, np.floor(w / w.sum() * n)).astype(int)
        sizes[np.argmax(sizes)] += n - sizes.sum()
        self.video_sizes = sizes
        vecs, video_of, scene_of = [], [], []
        scene_id = 0
        for v, size in enumerate(sizes):
            own_topics = rng.choice(clusters, size=int(rng.integers(3, 11)), replace=False)
            left = int(size)
            while left > 0:
                m = min(left, int(rng.integers(5, 41)))
                t = int(rng.choice(own_topics))
                scene = self.scene_centre(t)
                vecs.append(_unit(scene + self.clip_sigma * rng.normal(size=(m, DIM)).astype(np.float32)))
                video_of.append(np.full(m, v + 1))
                scene_of.append(np.full(m, scene_id))
                scene_id += 1
                left -= m
        self.vectors = np.concatenate(vecs)
        self.video_of = np.concatenate(video_of)  # 1-based source_video ids
        self.scene_of = np.concatenate(scene_of)
        self.scenes = scene_id

    def scene_centre(self, topic: int) -> np.ndarray:
        return _unit(self.topics[topic] + self.topic_sigma[topic] * self.rng.normal(size=DIM).astype(np.float32))

    def queries(self, count: int, among: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
        """Half perturbed stored vectors, half fresh samples of a random topic (of ``among`` rows' topics
        when given: then the stored vectors are picked from ``among`` and the fresh ones are new scenes
        near one of them)."""
        rng = self.rng
        pool = np.arange(len(self.vectors)) if among is None else among
        out, kinds = [], []
        for i in range(count):
            if i % 2 == 0:
                base = self.vectors[int(rng.choice(pool))]
                out.append(_unit(base + 0.01 * rng.normal(size=DIM).astype(np.float32)))
                kinds.append("perturbed")
            else:
                if among is None:
                    scene = self.scene_centre(int(rng.integers(len(self.topics))))
                else:  # a new scene around an existing clip of the pool (same topic neighbourhood)
                    scene = _unit(self.vectors[int(rng.choice(pool))] + 0.03 * rng.normal(size=DIM).astype(np.float32))
                out.append(_unit(scene + self.clip_sigma * rng.normal(size=DIM).astype(np.float32)))
                kinds.append("fresh")
        return np.stack(out), kinds


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, ids: np.ndarray) -> list[list[int]]:
    sims = queries @ vectors.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    out = []
    for qi in range(len(queries)):
        order = top[qi][np.argsort(-sims[qi, top[qi]])]
        out.append([int(ids[j]) for j in order])
    return out


# --------------------------------------------------------------------------------------------
# database


def load(url: str, corpus: Corpus) -> dict[str, float]:
    import psycopg
    from pgvector.psycopg import register_vector

    from heaters_dagster.database.embedded import to_libpq_url

    times = {}
    n = len(corpus.vectors)
    fps = 25.0
    with psycopg.connect(to_libpq_url(url)) as conn:
        register_vector(conn)
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy("COPY source_videos (id, title, source_uri, source_kind, state, fps, duration_s, frame_count) "
                          "FROM STDIN") as cp:
                for v, size in enumerate(corpus.video_sizes, start=1):
                    frames = int(size) * 100
                    cp.write_row((v, f"bench video {v}", f"/bench/{v}.mp4", "file", "spliced", fps, frames / fps,
                                  frames))
            # clips: 100 frames (4 s) each, consecutive within their video
            starts = np.zeros(n, dtype=np.int64)
            for v in np.unique(corpus.video_of):
                idx = np.nonzero(corpus.video_of == v)[0]
                starts[idx] = np.arange(len(idx)) * 100
            with cur.copy("COPY clips (id, source_video_id, start_frame, end_frame, start_s, end_s, fps, file_key, "
                          "state) FROM STDIN") as cp:
                for i in range(n):
                    a = int(starts[i])
                    vid = int(corpus.video_of[i])
                    cp.write_row((i + 1, vid, a, a + 100, a / fps, (a + 100) / fps, fps,
                                  f"sources/{vid}/clips/{a:08d}-{a + 100:08d}-bench.mp4", "embedded"))
            times["copy_videos_clips_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            with cur.copy("COPY embeddings (id, clip_id, model_id, strategy, dim, embedding, keyframe_count) "
                          "FROM STDIN WITH (FORMAT BINARY)") as cp:
                cp.set_types(["int8", "int8", "text", "varchar", "int4", "vector", "int4"])
                for i in range(n):
                    cp.write_row((i + 1, i + 1, MODEL_ID, STRATEGY, DIM, corpus.vectors[i], 3))
            times["copy_embeddings_s"] = time.perf_counter() - t1
            for table in ("source_videos", "clips", "embeddings"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        conn.commit()
        conn.autocommit = True
        t2 = time.perf_counter()
        conn.execute("VACUUM ANALYZE source_videos, clips, embeddings")
        times["vacuum_analyze_s"] = time.perf_counter() - t2
    return times


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "mean_ms": round(float(a.mean()), 3)}


class Runner:
    """Times search_vector calls. ``engine`` is the application's engine (psycopg's default
    ``prepare_threshold=5``: the 5th execution of the same SQL on a connection makes it a server-side
    prepared statement, and after 5 custom plans PostgreSQL may switch it to a cached *generic* plan,
    which does not look at later ``SET LOCAL enable_*`` changes). Forced-index runs therefore go
    through ``engine_noprep`` (``prepare_threshold=None``), where every call is planned afresh."""

    def __init__(self, engine: Any, engine_noprep: Any, index: str, k: int) -> None:
        self.engine = engine
        self.engine_noprep = engine_noprep
        self.index = index
        self.k = k

    def idx_scans(self) -> int:
        from sqlalchemy import text

        for engine in (self.engine, self.engine_noprep):  # the backends that ran the queries report their counts
            with engine.connect() as c:
                c.execute(text("SELECT pg_stat_force_next_flush()"))
                c.commit()
        time.sleep(0.05)
        with self.engine.connect() as c:
            c.execute(text("SELECT pg_stat_clear_snapshot()"))
            return int(c.execute(text("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = :n"),
                                 {"n": self.index}).scalar_one())

    def run(self, queries: np.ndarray, truth: list[list[int]], *, exact: bool = False, ef: int = 100,
            vid: int | None = None, force_index: bool = False, fn: Callable[..., Any] | None = None) -> dict[str, Any]:
        from sqlalchemy import text

        from heaters_dagster.database.engine import session_scope
        from heaters_dagster.search import search_vector

        before = self.idx_scans()
        engine = self.engine_noprep if force_index else self.engine
        lat, recalls, counts = [], [], []
        for q, t in zip(queries, truth):
            t0 = time.perf_counter()
            with session_scope(engine) as s:
                if exact:
                    s.execute(text("SET LOCAL enable_indexscan = off"))
                if force_index:  # no Sort node below the LIMIT: the HNSW (iterative) index scan must order
                    s.execute(text("SET LOCAL enable_sort = off"))
                hits = (fn or search_vector)(s, q, model_id=MODEL_ID, strategy=STRATEGY, k=self.k, ef_search=ef,
                                             source_video_id=vid)
            lat.append((time.perf_counter() - t0) * 1000)
            got = [h.clip_id for h in hits]
            counts.append(len(got))
            recalls.append(len(set(got) & set(t[: self.k])) / min(self.k, len(t)))
        after = self.idx_scans()
        out = {"queries": len(queries), **percentiles(lat), "recall_at_k": round(float(np.mean(recalls)), 4),
               "recall_min": round(float(np.min(recalls)), 2),
               "always_k_rows": bool(all(c == min(self.k, len(t)) for c, t in zip(counts, truth))),
               "min_rows": int(min(counts)),
               "short_queries": int(sum(c < min(self.k, len(t)) for c, t in zip(counts, truth))),
               "hnsw_idx_scans": after - before}
        return out


def exact_video_search(session: Any, query: np.ndarray, *, model_id: str, strategy: str, k: int = 10,
                       source_video_id: int, ef_search: int = 100) -> list[Any]:
    """Prototype for search.py: with a source_video_id filter, order by ``embedding <=> q`` without the
    ``::vector(dim)`` cast, so the partial HNSW index (on the cast expression) cannot serve the ORDER BY
    and PostgreSQL answers exactly from the video's rows (ix_clips_source_start -> embeddings)."""
    from sqlalchemy import text

    from heaters_dagster.search import SearchHit

    q = np.asarray(query, dtype=np.float32).reshape(-1)
    dim = int(q.size)
    sql = f"""
        WITH nearest AS MATERIALIZED (
            SELECT e.clip_id, e.embedding <=> CAST(:q AS vector) AS distance
            FROM embeddings e JOIN clips c ON c.id = e.clip_id
            WHERE e.model_id = :model_id AND e.strategy = :strategy AND e.dim = {dim}
              AND c.source_video_id = :vid AND c.state = ANY(:states)
            ORDER BY e.embedding <=> CAST(:q AS vector)
            LIMIT :k
        )
        SELECT n.clip_id, n.distance, c.source_video_id, c.start_s, c.end_s, c.state, c.file_key
        FROM nearest n JOIN clips c ON c.id = n.clip_id
        ORDER BY n.distance, n.clip_id
    """
    rows = session.execute(text(sql), {"q": q.tolist(), "model_id": model_id, "strategy": strategy,
                                       "vid": source_video_id, "states": ["embedded"], "k": k}).all()
    return [SearchHit(clip_id=r.clip_id, similarity=1.0 - float(r.distance), source_video_id=r.source_video_id,
                      start_s=r.start_s, end_s=r.end_s, state=r.state, file_key=r.file_key) for r in rows]


def floor(engine: Any, queries: np.ndarray) -> dict[str, Any]:
    """Client-side cost of the transaction shape alone: session, the two SET LOCALs, a statement
    binding the 512-float query vector (cast to vector, no table access), commit."""
    from sqlalchemy import text

    from heaters_dagster.database.engine import session_scope

    lat = []
    for q in queries:
        t0 = time.perf_counter()
        with session_scope(engine) as s:
            s.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
            s.execute(text("SET LOCAL hnsw.ef_search = 100"))
            s.execute(text(f"SELECT vector_dims(CAST(:q AS vector({DIM})))"), {"q": np.asarray(q).tolist()}).all()
        lat.append((time.perf_counter() - t0) * 1000)
    return {"queries": len(queries), **percentiles(lat)}


def capture_sql(engine: Any, call: Callable[[], Any]) -> tuple[str, Any]:
    """Run ``call`` and return the last SELECT statement (and its parameters) the engine sent."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if "WITH nearest" in statement:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    return seen[-1]


def _short(plan: list[str]) -> list[str]:
    return [re.sub(r"'\[[^\]]*\]'", "'[...]'", line) for line in plan]


def explain(engine: Any, q: np.ndarray, *, vid: int | None, ef: int = 100, k: int = 10,
            force_index: bool = False, engine_noprep: Any = None) -> dict[str, Any]:
    """EXPLAIN ANALYZE of the exact SQL a search_vector call sends, with its bound parameters, plus the
    plan of the same statement as a *generic* prepared plan (what a server-side prepared statement
    gets when PostgreSQL stops re-planning with the parameter values)."""
    from sqlalchemy import text

    from heaters_dagster.database.engine import session_scope
    from heaters_dagster.search import search_vector

    def call() -> None:
        with session_scope(engine) as s:
            search_vector(s, q, model_id=MODEL_ID, strategy=STRATEGY, k=k, ef_search=ef, source_video_id=vid)

    statement, params = capture_sql(engine, call)
    with session_scope(engine_noprep if force_index else engine) as s:
        s.execute(text("SET LOCAL hnsw.iterative_scan = relaxed_order"))
        s.execute(text(f"SET LOCAL hnsw.ef_search = {max(ef, k)}"))
        if force_index:
            s.execute(text("SET LOCAL enable_sort = off"))
        rows = s.connection().exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params).all()
        plan = _short([r[0] for r in rows])
    if force_index:
        return {"sql": " ".join(statement.split()), "plan": plan, "uses_hnsw": _uses(plan)}
    # generic plan: the same statement with $n placeholders, PREPAREd, EXPLAIN EXECUTE under force_generic_plan
    names = [name for name in params if f"%({name})s" in statement]
    sql_n = statement
    for i, name in enumerate(names, start=1):
        sql_n = sql_n.replace(f"%({name})s", f"${i}")
    args = []
    for name in names:
        v = params[name]
        if isinstance(v, list) and v and isinstance(v[0], float):
            args.append("'[" + ",".join(repr(float(x)) for x in v) + "]'::vector")
        elif isinstance(v, list):
            args.append("ARRAY[" + ",".join("'" + str(x) + "'" for x in v) + "]::varchar[]")
        elif isinstance(v, str):
            args.append("'" + v.replace("'", "''") + "'")
        else:
            args.append(str(v))
    with session_scope(engine) as s:
        c = s.connection()
        c.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        c.exec_driver_sql(f"PREPARE bench_generic AS {sql_n}")
        generic = _short([r[0] for r in c.exec_driver_sql(
            f"EXPLAIN (COSTS OFF) EXECUTE bench_generic({', '.join(args)})").all()])
        c.exec_driver_sql("DEALLOCATE bench_generic")
    return {"sql": " ".join(statement.split()), "plan": plan, "uses_hnsw": _uses(plan),
            "generic_plan": generic, "generic_uses_hnsw": _uses(generic)}


def _uses(plan: list[str]) -> bool:
    return any("ix_embeddings_hnsw_" in line for line in plan)


def prototype_literals(engine: Any, q: np.ndarray) -> dict[str, Any]:
    """The fix prototype: under a generic plan (``plan_cache_mode = force_generic_plan``) is the HNSW
    index usable when model_id is a SQL literal (like dim already is), and when LIMIT k is one too?"""
    from heaters_dagster.database.engine import session_scope

    lit = "'" + MODEL_ID.replace("'", "''") + "'"
    vec = "'[" + ",".join(repr(float(x)) for x in q) + "]'::vector"
    out = {}
    for name, model_sql, limit_sql in (("model_param_limit_param", "$5", "$4"),
                                       ("model_literal_limit_param", lit, "$4"),
                                       ("model_param_limit_literal", "$5", "10"),
                                       ("model_literal_limit_literal", lit, "10")):
        sql = f"""
            WITH nearest AS MATERIALIZED (
                SELECT e.clip_id, e.embedding::vector({DIM}) <=> CAST($1 AS vector({DIM})) AS distance
                FROM embeddings e JOIN clips c ON c.id = e.clip_id
                WHERE e.model_id = {model_sql} AND e.strategy = $2 AND e.dim = {DIM} AND c.state = ANY($3)
                ORDER BY e.embedding::vector({DIM}) <=> CAST($1 AS vector({DIM}))
                LIMIT {limit_sql}
            )
            SELECT n.clip_id, n.distance FROM nearest n JOIN clips c ON c.id = n.clip_id
            ORDER BY n.distance, n.clip_id"""
        with session_scope(engine) as s:
            c = s.connection()
            c.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            c.exec_driver_sql(f"PREPARE bench_literal(vector, varchar, varchar[], int, text) AS {sql}")
            plan = _short([r[0] for r in c.exec_driver_sql(
                f"EXPLAIN (COSTS OFF) EXECUTE bench_literal({vec}, '{STRATEGY}', ARRAY['embedded'], 10, {lit})").all()])
            c.exec_driver_sql("DEALLOCATE bench_literal")
        out[name] = {"generic_uses_hnsw": _uses(plan), "generic_plan": plan}
    return out


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="stored vectors (clips)")
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--clusters", type=int, default=300, help="topic clusters")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=50, help="queries timed on the exact (seq scan) path")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--ef", default="40,100,200", help="hnsw.ef_search values (100 is search_vector's default)")
    ap.add_argument("--maintenance-work-mem", default="1GB",
                    help="for the index build ('' = server default, 64MB: the graph then spills and builds slowly)")
    ap.add_argument("--alt-index", default="",
                    help="after the main figures, rebuild the same partial index WITH (these options), e.g. "
                         "'m=16, ef_construction=200', and measure the HNSW paths again")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    efs = [int(x) for x in args.ef.split(",") if x]

    home = Path(tempfile.mkdtemp(prefix="heaters-bench-search-"))
    atexit.register(shutil.rmtree, home, True)  # registered first, so it runs after the server stops
    os.environ["HEATERS_HOME"] = str(home)
    for var in ("HEATERS_DATABASE_URL", "HEATERS_DAGSTER_DATABASE_URL"):
        os.environ.pop(var, None)

    from sqlalchemy import text

    from heaters_dagster.database.embedded import start_embedded
    from heaters_dagster.database.engine import get_engine, session_scope
    from heaters_dagster.database.migrate import upgrade
    from heaters_dagster.io_managers.embeddings import ensure_index, index_name

    t_start = time.perf_counter()
    print(f"HEATERS_HOME={home}", flush=True)
    urls = start_embedded()
    url = urls["heaters"]
    upgrade(url)
    engine = get_engine(url)
    with engine.connect() as c:
        versions = {"postgres": c.execute(text("SHOW server_version")).scalar_one(),
                    "pgvector": c.execute(text("SELECT extversion FROM pg_extension WHERE extname='vector'")).scalar_one(),
                    "shared_buffers": c.execute(text("SHOW shared_buffers")).scalar_one(),
                    "maintenance_work_mem_default": c.execute(text("SHOW maintenance_work_mem")).scalar_one(),
                    "max_parallel_maintenance_workers": c.execute(text("SHOW max_parallel_maintenance_workers")).scalar_one()}
    print(f"PostgreSQL {versions['postgres']}, pgvector {versions['pgvector']}", flush=True)

    t0 = time.perf_counter()
    corpus = Corpus(args.n, args.videos, args.clusters, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"generated {len(corpus.vectors)} vectors ({corpus.scenes} scenes, {args.clusters} topics, "
          f"{args.videos} videos) in {gen_s:.1f}s", flush=True)
    load_times = load(url, corpus)
    print("loaded: " + ", ".join(f"{k} {v:.1f}" for k, v in load_times.items()), flush=True)

    # --- index build through ensure_index
    idx = index_name(MODEL_ID, DIM)
    notices: list[str] = []
    t0 = time.perf_counter()
    with session_scope(engine) as s:
        raw = s.connection().connection.driver_connection
        raw.add_notice_handler(lambda d: notices.append(d.message_primary))
        if args.maintenance_work_mem:
            s.execute(text(f"SET LOCAL maintenance_work_mem = '{args.maintenance_work_mem}'"))
        ensure_index(s, MODEL_ID, DIM)
    build_s = time.perf_counter() - t0
    with engine.connect() as c:
        sizes = {k: int(c.execute(text(f"SELECT {f}")).scalar_one()) for k, f in {
            "index_bytes": f"pg_relation_size('{idx}')",
            "embeddings_total_bytes": "pg_total_relation_size('embeddings')",
            "embeddings_toast_bytes": "pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'embeddings'",
        }.items()}
    print(f"HNSW index {idx} built in {build_s:.1f}s ({sizes['index_bytes'] / 2**20:.0f} MiB); "
          f"notices: {notices or 'none'}", flush=True)

    # --- queries and ground truth
    ids = np.arange(1, len(corpus.vectors) + 1)
    queries, kinds = corpus.queries(args.queries)
    truth = exact_topk(corpus.vectors, queries, args.k, ids)
    target = len(corpus.vectors) * 0.01
    vid = int(np.argmin(np.abs(corpus.video_sizes - target))) + 1
    in_vid = np.nonzero(corpus.video_of == vid)[0]
    truth_f = exact_topk(corpus.vectors[in_vid], queries, args.k, ids[in_vid])
    own_q, _ = corpus.queries(max(2, args.queries // 4), among=in_vid)
    truth_own = exact_topk(corpus.vectors[in_vid], own_q, args.k, ids[in_vid])
    print(f"filter video {vid}: {len(in_vid)} clips ({len(in_vid) / len(corpus.vectors):.2%})", flush=True)

    from sqlalchemy import create_engine

    from heaters_dagster.database.engine import normalise_url

    engine_noprep = create_engine(normalise_url(url), connect_args={"prepare_threshold": None})
    runner = Runner(engine, engine_noprep, idx, args.k)
    # warm-up (plans, caches): not timed
    runner.run(queries[:10], truth[:10])
    runner.run(queries[:3], truth[:3], exact=True)

    plans = {"unfiltered": explain(engine, queries[1], vid=None),
             "filtered": explain(engine, queries[1], vid=vid)}
    plans["filtered_forced_index"] = explain(engine, queries[1], vid=vid, force_index=True,
                                             engine_noprep=engine_noprep)
    plans["generic_plan_prototypes"] = prototype_literals(engine, queries[1])
    with session_scope(engine) as s:
        stmt, params = capture_sql(engine, lambda: exact_video_search(s, queries[1], model_id=MODEL_ID,
                                                                      strategy=STRATEGY, source_video_id=vid))
        pplan = _short([r[0] for r in s.connection().exec_driver_sql(
            "EXPLAIN (ANALYZE, COSTS OFF) " + stmt, params).all()])
    plans["prototype_exact_video_filter"] = {"plan": pplan, "uses_hnsw": _uses(pplan)}
    print("\nEXPLAIN ANALYZE of the exact video-filter prototype:")
    for line in pplan:
        print("   " + line)
    for name in ("unfiltered", "filtered"):
        p = plans[name]
        print(f"\nEXPLAIN ANALYZE of search_vector ({name}): HNSW used = {p['uses_hnsw']}")
        for line in p["plan"][:14]:
            print("   " + line)
        print(f"  as a generic prepared plan: HNSW used = {p['generic_uses_hnsw']}")
        for line in p["generic_plan"][:8]:
            print("   " + line)
    p = plans["filtered_forced_index"]
    print(f"\nEXPLAIN ANALYZE of search_vector (filtered, enable_sort = off): HNSW used = {p['uses_hnsw']}")
    for line in p["plan"][:16]:
        print("   " + line)
    for name, p in plans["generic_plan_prototypes"].items():
        print(f"  generic plan, {name}: HNSW used = {p['generic_uses_hnsw']}")
    sys.stdout.flush()

    ne = min(args.exact_queries, len(queries))
    results: dict[str, Any] = {}
    results["floor_no_search"] = floor(engine, queries)
    print(f"floor (transaction + SETs + vector bind, no search): {results['floor_no_search']}", flush=True)
    t0 = time.perf_counter()
    results["exact"] = runner.run(queries[:ne], truth[:ne], exact=True)
    results["exact"]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"exact: {results['exact']}", flush=True)
    for ef in efs:
        results[f"hnsw_ef{ef}"] = runner.run(queries, truth, ef=ef)
        print(f"hnsw ef={ef}: {results[f'hnsw_ef{ef}']}", flush=True)
    # by query kind at the default ef
    for kind in ("perturbed", "fresh"):
        sel = [i for i, kk in enumerate(kinds) if kk == kind]
        results[f"hnsw_ef100_{kind}"] = runner.run(queries[sel], [truth[i] for i in sel], ef=100)
    results["exact_filtered"] = runner.run(queries[:ne], truth_f[:ne], exact=True, vid=vid)
    print(f"exact filtered: {results['exact_filtered']}", flush=True)
    for ef in efs:
        results[f"hnsw_filtered_ef{ef}"] = runner.run(queries, truth_f, ef=ef, vid=vid)
        print(f"hnsw filtered ef={ef}: {results[f'hnsw_filtered_ef{ef}']}", flush=True)
    for ef in efs:
        results[f"hnsw_filtered_forced_ef{ef}"] = runner.run(queries, truth_f, ef=ef, vid=vid, force_index=True)
        print(f"hnsw filtered forced ef={ef}: {results[f'hnsw_filtered_forced_ef{ef}']}", flush=True)
    results["prototype_exact_video_filter"] = runner.run(queries, truth_f, vid=vid, fn=exact_video_search)
    print(f"prototype exact video filter: {results['prototype_exact_video_filter']}", flush=True)
    results["hnsw_filtered_own_video_ef100"] = runner.run(own_q, truth_own, ef=100, vid=vid)
    results["hnsw_filtered_forced_own_video_ef100"] = runner.run(own_q, truth_own, ef=100, vid=vid,
                                                                  force_index=True)
    print(f"hnsw filtered, queries near the video's own clips: {results['hnsw_filtered_own_video_ef100']}")

    main_s = time.perf_counter() - t_start
    alt: dict[str, Any] = {}
    if args.alt_index:
        from heaters_dagster.io_managers.embeddings import _literal

        t0 = time.perf_counter()
        with session_scope(engine) as s:
            s.execute(text(f"DROP INDEX {idx}"))
            if args.maintenance_work_mem:
                s.execute(text(f"SET LOCAL maintenance_work_mem = '{args.maintenance_work_mem}'"))
            s.execute(text(f"CREATE INDEX {idx} ON embeddings USING hnsw ((embedding::vector({DIM})) vector_cosine_ops) "
                           f"WITH ({args.alt_index}) WHERE model_id = {_literal(MODEL_ID)} AND dim = {DIM}"))
        alt = {"with": args.alt_index, "build_s": round(time.perf_counter() - t0, 2)}
        with engine.connect() as c:
            alt["index_bytes"] = int(c.execute(text(f"SELECT pg_relation_size('{idx}')")).scalar_one())
        print(f"\nalternative index WITH ({args.alt_index}) built in {alt['build_s']:.1f}s", flush=True)
        for ef in efs:
            results[f"alt_hnsw_ef{ef}"] = runner.run(queries, truth, ef=ef)
            print(f"alt hnsw ef={ef}: {results[f'alt_hnsw_ef{ef}']}", flush=True)
        results["alt_hnsw_filtered_forced_ef100"] = runner.run(queries, truth_f, ef=100, vid=vid, force_index=True)

    # --- table
    print()
    head = f"{'path':38s} {'queries':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'recall@' + str(args.k):>9s} " \
           f"{'min':>5s} {'k rows':>6s} {'idx scans':>9s}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        if "recall_at_k" in r:
            tail = (f"{r['recall_at_k']:9.4f} {r['recall_min']:5.2f} {str(r['always_k_rows']):>6s} "
                    f"{r['hnsw_idx_scans']:9d}")
        else:
            tail = f"{'-':>9s} {'-':>5s} {'-':>6s} {'-':>9s}"
        print(f"{name:38s} {r['queries']:7d} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['p99_ms']:8.2f} {tail}")
    total_s = time.perf_counter() - t_start
    print(f"\nindex build {build_s:.1f}s, run without --alt-index {main_s:.0f}s, total {total_s:.0f}s")

    out = {
        "benchmark": "search",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform()},
        "server": versions,
        "data": {"n": len(corpus.vectors), "dim": DIM, "videos": args.videos, "topics": args.clusters,
                 "scenes": corpus.scenes, "model_id": MODEL_ID, "strategy": STRATEGY, "seed": args.seed,
                 "filter_video": {"id": vid, "clips": int(len(in_vid)),
                                  "fraction": round(len(in_vid) / len(corpus.vectors), 4)}},
        "load_s": {k: round(v, 2) for k, v in load_times.items()},
        "index": {"name": idx, "build_s": round(build_s, 2), "maintenance_work_mem": args.maintenance_work_mem or
                  versions["maintenance_work_mem_default"], "notices": notices, **sizes},
        "alt_index": alt,
        "settings": {"k": args.k, "ef_search": efs, "queries": args.queries, "exact_queries": ne,
                     "query_kinds": "half perturbed stored vectors (sigma 0.01/dim), half fresh samples"},
        "results": results,
        "plans": plans,
        "main_s": round(main_s, 1),
        "total_s": round(total_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()


# -- `heaters bench search` (bench/common.py) ----------------------------------------------------
NAME = "search"
DESCRIPTION = ("pgvector HNSW search (search_vector) against the exact scan on the embedded Postgres; full: "
               "100,000 clustered 512-d vectors, smoke: 2,000.")


def summarize(doc: dict) -> list[dict]:
    from common import figure

    r = doc["results"]
    exact = r["exact"]
    figs = [figure("search_vector p95 latency (ef 100)", r["hnsw_ef100"]["p95_ms"], "ms", baseline=exact["p95_ms"],
                   baseline_name="exact scan"),
            figure("recall@10 (ef 100)", r["hnsw_ef100"]["recall_at_k"], "", baseline=exact["recall_at_k"],
                   baseline_name="exact scan"),
            figure("index used (idx scans / queries, ef 100)",
                   r["hnsw_ef100"]["hnsw_idx_scans"] / max(1, r["hnsw_ef100"]["queries"]), "", target=1.0, kind="min")]
    if "exact_filtered" in r and "hnsw_filtered_ef100" in r:
        figs.append(figure("filtered (1 video) p95 latency", r["hnsw_filtered_ef100"]["p95_ms"], "ms",
                           baseline=r["exact_filtered"]["p95_ms"], baseline_name="exact scan"))
    return figs


def run(smoke: bool, out_dir: Path) -> dict:
    from common import run_script

    args = (["--n", "2000", "--videos", "10", "--clusters", "20", "--queries", "20", "--exact-queries", "5",
             "--ef", "100"] if smoke else ["--alt-index", "m=16, ef_construction=200"])
    doc = run_script("bench_search.py", args, out_dir, NAME)
    doc["figures"] = summarize(doc)
    return doc
