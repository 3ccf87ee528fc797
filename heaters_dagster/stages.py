"""The stage table: every pipeline stage declared once, as data.

Sensors, assets and the generic executor are built from these entries; a stage has no
boilerplate of its own. Adding a stage is one entry here and one handler function in
``heaters_dagster/pipeline/handlers.py`` (which calls a pure media function).

The table is also the asset graph: each entry names its ``upstream`` nodes (stages, or the
human ``review`` step, which Heaters does not compute). Every video stage is partitioned by the
one ``videos`` partition set and every clip stage by the one ``clips`` set, so an edge between
two clip stages maps clip N to clip N (identity); see ``heaters_dagster/assets/graph.py`` for the
video -> clip edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from importlib import import_module
from typing import Any, Callable

from heaters_dagster.state_machine import ClipState as C
from heaters_dagster.state_machine import VideoState as V


@dataclass(frozen=True)
class Stage:
    name: str
    entity: str  # "video" or "clip": the partition key is that row's id
    input_states: tuple[str, ...]  # ready to run (the first is where a transient failure returns)
    in_progress_state: str
    output_state: str
    failure_state: str
    handler: str  # "module:function"; per item (ItemContext, ItemSnapshot) -> ItemOutput
    description: str
    io_manager_key: str = "artifact_io_manager"
    batch_handler: bool = False  # handler takes (ctx, [items]) -> {id: ItemOutput | Exception}
    max_partitions_per_run: int = 50  # how many partitions one run covers at most
    max_retries: int = 3  # transient failures: RetryPolicy with exponential backoff and jitter
    retry_delay_s: float = 2.0
    upstream: tuple[str, ...] = ()  # graph nodes this stage's asset depends on (stages or "review")
    registers_new_clips: bool = False  # new clips of this stage join the shared clip partition set
    # How many partitions that are not this stage's work a run's range may bridge (clips in other
    # states between two ready ones in the shared clip set). 0: ranges of ready items only.
    max_gap: int = 0
    checks: tuple[str, ...] = ()  # asset checks evaluated in every run (heaters_dagster/checks.py)
    ready_sql: str | None = None  # extra SQL readiness condition on the item's row (sensor and claim)
    # States past this stage from which a run launched by a person (the UI, a backfill) may take an
    # item back through this stage: re-render a sprite, re-extract keyframes, re-embed. The item's
    # failure state always qualifies (a retry). Runs requested by the stage sensors never rewind.
    rerun_from: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)  # defaults, overridable in the executor config
    kinds: tuple[str, ...] = ("ffmpeg",)
    # For a stage whose every run pays a fixed start cost (a model load): while one of its runs is
    # in flight, or its upstream stage still has items ready or in progress, its sensor holds newly
    # ready items for up to this long (or until that ends, or a full batch is ready), so they share
    # the next run. The window is the longer of this and HEATERS_BATCH_WAIT_S.
    hold_while_in_flight_s: float = 0.0
    # A stage whose work follows another stage's at once (same entity, that stage its only upstream):
    # both are one Dagster op, and that stage's job runs this one right after it, in the same step,
    # on the items it finished: no sensor tick and no run launch in between (HEATERS_CHAIN_STAGES).
    # This stage's own job and sensor still take every item that reaches its input state otherwise.
    runs_after: str | None = None

    @property
    def partitions_name(self) -> str:
        """The shared dynamic partition set of this stage's entity: ``videos`` or ``clips``."""
        return partitions_name_for(self.entity)

    @property
    def asset_name(self) -> str:
        return self.name

    @property
    def retry_state(self) -> str:
        return self.input_states[0]

    @cached_property
    def handler_fn(self) -> Callable[..., Any]:
        module, _, attr = self.handler.partition(":")
        return getattr(import_module(module), attr)

    def run_key(self, item_id: int, version: int) -> str:
        return f"{self.name}:{item_id}:v{version}"


def partitions_name_for(entity: str) -> str:
    return f"{entity}s"


@dataclass(frozen=True)
class HumanStep:
    """A node of the asset graph that no stage computes: the reviewer's decision on a clip. The
    review sensor records a materialization of its partition (the clip) for every applied event."""

    name: str
    entity: str
    upstream: tuple[str, ...]
    description: str

    @property
    def asset_name(self) -> str:
        return self.name

    @property
    def partitions_name(self) -> str:
        return partitions_name_for(self.entity)


REVIEW = HumanStep(
    name="review",
    entity="clip",
    upstream=("sprite",),
    description="The human review of a clip on the review page (approve, skip, archive, split, merge, group, "
    "undo). Not computed by Dagster: the review sensor records one materialization per clip an applied event "
    "changed (decision, state, reviewer and event id in its metadata), and an observation per rejected event.",
)


_H = "heaters_dagster.pipeline.handlers"


def embedding_defaults() -> dict[str, Any]:
    """Embedding settings from the configuration (environment or heaters.toml; README: "Configuration")."""
    from heaters_dagster.settings import get_settings

    return {**get_settings().embedding_params(), "keyframe_strategy": "multi"}

STAGES: tuple[Stage, ...] = (
    Stage(
        name="ingest",
        entity="video",
        input_states=(V.NEW,),
        in_progress_state=V.DOWNLOADING,
        output_state=V.DOWNLOADED,
        failure_state=V.INGESTION_FAILED,
        handler=f"{_H}:ingest",
        description="Fetch the submitted video (yt-dlp for URLs), validate it with ffprobe, detect its "
        "scenes and normalise it to constant-frame-rate H.264/AAC MP4 with faststart and a keyframe at "
        "every cut (the scene plan splice cuts by).",
        io_manager_key="video_io_manager",
        max_partitions_per_run=4,
        # detect_first: detect scenes on the source (with splice's detection parameters) and force
        # keyframes at the cuts, so splice cuts clips by stream copy (heaters_dagster.pipeline.scene_plan)
        params={"crf": 20, "preset": "fast", "audio_bitrate": "192k", "detect_first": True},
        kinds=("ffmpeg", "yt-dlp"),
    ),
    Stage(
        name="splice",
        entity="video",
        input_states=(V.DOWNLOADED,),
        in_progress_state=V.SPLICING,
        output_state=V.SPLICED,
        failure_state=V.SPLICING_FAILED,
        handler=f"{_H}:splice",
        description="Cut one H.264/AAC file per scene: by stream copy at the cuts ingest found and forced "
        "as keyframes, or, when that plan does not apply, detect scenes on a downscaled decode of the "
        "normalised file and encode the clips; clips are inserted as `spliced` and registered in the "
        "shared `clips` partition set.",
        io_manager_key="video_io_manager",
        max_partitions_per_run=4,
        upstream=("ingest",),
        runs_after="ingest",
        registers_new_clips=True,
        checks=("clips_tile_video",),
        # detector: "hybrid" (stream pass + TransNetV2 on windows around doubtful frames) or
        # "stream" (the small-frame pass alone); hybrid: overrides of the hybrid's parameters
        # (heaters_dagster.media.scenes.hybrid.DEFAULTS, e.g. {"hard_threshold": 0.5, "grad_window": 48,
        # "precision": "fp32"}).
        params={"detector": "hybrid", "threshold": None, "hybrid": {}, "min_scene_s": 1.0, "crf": 23,
                "preset": "veryfast", "audio_bitrate": "128k"},
    ),
    Stage(
        name="sprite",
        rerun_from=(C.PENDING_REVIEW,),
        entity="clip",
        input_states=(C.SPLICED,),
        in_progress_state=C.GENERATING_SPRITE,
        output_state=C.PENDING_REVIEW,
        failure_state=C.SPRITE_FAILED,
        handler=f"{_H}:sprite",
        description="Render the clip as a JPEG sprite sheet for the review page (layout stored with "
        "the artifact); the clip moves to `pending_review`.",
        max_partitions_per_run=100,
        upstream=("splice",),
        checks=("sprite_matches_layout",),
        params={"tile_width": 480, "max_fps": 24.0, "jpeg_qscale": 3},
    ),
    Stage(
        name="keyframes",
        rerun_from=(C.KEYFRAMED, C.EMBEDDED),
        entity="clip",
        input_states=(C.REVIEW_APPROVED,),
        in_progress_state=C.KEYFRAMING,
        output_state=C.KEYFRAMED,
        failure_state=C.KEYFRAME_FAILED,
        handler=f"{_H}:keyframes",
        description="Extract keyframes of an approved clip (`multi`: 25/50/75 %, or `midpoint`) by seeking, "
        "with exact frame index and time; JPEGs stored as clip artifacts.",
        max_partitions_per_run=100,
        upstream=("review",),
        max_gap=100,
        params={"strategy": "multi", "jpeg_quality": 90},
    ),
    Stage(
        name="embedding",
        rerun_from=(C.EMBEDDED,),
        entity="clip",
        input_states=(C.KEYFRAMED,),
        in_progress_state=C.EMBEDDING,
        output_state=C.EMBEDDED,
        failure_state=C.EMBEDDING_FAILED,
        handler=f"{_H}:embedding",
        batch_handler=True,
        io_manager_key="embedding_io_manager",
        description="Embed the keyframes of every clip of the run with open_clip in shared batches (model "
        "loaded once per run), L2-normalised, aggregated per strategy and stored in pgvector.",
        max_partitions_per_run=200,
        upstream=("keyframes",),
        max_gap=200,
        checks=("unit_vector",),
        params=embedding_defaults(),
        kinds=("pytorch", "pgvector"),
        # a run loads the model (imports and an int8 conversion, ~8 s of CPU on 2 cores): clips
        # keyframed while one runs wait for it to end and share the next run
        hold_while_in_flight_s=60.0,
    ),
    Stage(
        name="split",
        entity="clip",
        input_states=(C.SPLIT_PENDING,),
        in_progress_state=C.SPLITTING,
        output_state=C.REVIEW_ARCHIVED,
        failure_state=C.SPLIT_FAILED,
        handler=f"{_H}:split",
        description="Once a split's undo window has passed, re-encode the two parts exactly at the frame "
        "boundary from the source video; the parts go to sprite -> review, the original is archived.",
        ready_sql="(pending_op->>'ready_at')::timestamptz <= now()",
        upstream=("review",),
        registers_new_clips=True,
        checks=("cut_tiles_video",),
        max_partitions_per_run=20,
        max_gap=20,
        params={"crf": 23, "preset": "veryfast", "audio_bitrate": "128k"},
    ),
    Stage(
        name="merge",
        entity="clip",
        input_states=(C.MERGE_PENDING,),
        in_progress_state=C.MERGING,
        output_state=C.REVIEW_ARCHIVED,
        failure_state=C.MERGE_FAILED,
        handler=f"{_H}:merge",
        description="Once a merge's undo window has passed, cut the two adjacent clips' frames as one clip "
        "from the source video; both originals are archived, the new clip goes to sprite -> review.",
        ready_sql="pending_op->>'role' = 'source' AND (pending_op->>'ready_at')::timestamptz <= now()",
        upstream=("review",),
        registers_new_clips=True,
        checks=("cut_tiles_video",),
        max_partitions_per_run=20,
        max_gap=20,
        params={"crf": 23, "preset": "veryfast", "audio_bitrate": "128k"},
    ),
    Stage(
        name="archive",
        entity="clip",
        input_states=(C.REVIEW_ARCHIVED,),
        in_progress_state=C.ARCHIVING,
        output_state=C.ARCHIVED,
        failure_state=C.ARCHIVE_FAILED,
        handler=f"{_H}:archive",
        description="Delete an archived clip's file and every artifact from the store; the rows stay.",
        max_partitions_per_run=200,
        upstream=("review",),
        max_gap=200,
        kinds=("storage",),
    ),
)

STAGES_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def stage_groups(stages: tuple[Stage, ...] = STAGES) -> list[tuple[Stage, ...]]:
    """The stages as Dagster ops: each stage with the stages that run after it (``runs_after``)."""
    by_name = {s.name: s for s in stages}
    names = by_name.keys()
    for s in stages:
        if s.runs_after is None or s.runs_after not in names:  # its head not in this table: a stage of its own
            continue
        head = by_name[s.runs_after]
        if head.runs_after or head.entity != s.entity or s.upstream != (head.name,):
            raise ValueError(f"stage {s.name}: runs_after={s.runs_after!r} must name a stage of this table, of "
                             f"the same entity, that is its only upstream and runs after no other")
    return [(h, *(s for s in stages if s.runs_after == h.name)) for h in stages if h.runs_after is None
            or h.runs_after not in names]


def followers_of(stage: Stage, stages: tuple[Stage, ...] = STAGES) -> tuple[Stage, ...]:
    return tuple(s for s in stages if s.runs_after == stage.name)


HUMAN_STEPS: tuple[HumanStep, ...] = (REVIEW,)
NODES_BY_NAME: dict[str, "Stage | HumanStep"] = {**STAGES_BY_NAME, **{h.name: h for h in HUMAN_STEPS}}


def node_entity(name: str) -> str:
    """The entity (``video``/``clip``) a graph node is partitioned by."""
    try:
        return NODES_BY_NAME[name].entity
    except KeyError:
        raise KeyError(f"unknown graph node {name!r}; nodes: {', '.join(NODES_BY_NAME)}") from None


def check_stage_params(params: dict[str, dict[str, Any]], where: str) -> None:
    """Refuse (ConfigError) stage parameters that name an unknown stage or parameter: a typo must
    not fall back to a default silently."""
    from heaters_dagster.errors import ConfigError

    for stage, given in params.items():
        if stage not in STAGES_BY_NAME:
            raise ConfigError(f"{where} names an unknown stage {stage!r} (stages: {', '.join(STAGES_BY_NAME)})")
        unknown = sorted(set(given) - set(STAGES_BY_NAME[stage].params))
        if unknown:
            known = ", ".join(STAGES_BY_NAME[stage].params) or "none"
            raise ConfigError(f"{where} names unknown {stage} parameters: {', '.join(unknown)} (known: {known})")


def get_stage(name: str) -> Stage:
    try:
        return STAGES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES_BY_NAME)}") from None
