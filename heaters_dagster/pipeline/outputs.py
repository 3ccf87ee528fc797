"""What a stage handler hands back for persistence: typed, no Dagster, no database."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ItemSnapshot:
    """A read-only copy of the claimed row (plus what handlers need from its source video)."""

    kind: str  # "video" | "clip"
    id: int
    state: str
    version: int
    retry_count: int
    row: dict[str, Any]
    source: dict[str, Any] | None = None  # the clip's source video row
    artifacts: tuple[dict[str, Any], ...] = ()  # a clip's stored artifacts: type, strategy, tag, key, meta

    @property
    def artifact_keys(self) -> tuple[str, ...]:
        return tuple(a["storage_key"] for a in self.artifacts)

    def __getitem__(self, name: str) -> Any:
        return self.row[name]


@dataclass(frozen=True)
class FileToStore:
    """A local file the IO manager moves into the store under ``key``."""

    key: str
    local_path: Path


@dataclass(frozen=True)
class ArtifactOut:
    artifact_type: str  # "sprite" | "keyframe"
    file: FileToStore
    strategy: str = ""
    tag: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewClipOut:
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    fps: float
    file: FileToStore
    origin: str = "splice"
    parent_clip_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class EmbeddingOut:
    model_id: str
    strategy: str
    vector: Any  # numpy float32 array, L2-normalised
    keyframe_count: int


@dataclass
class ItemOutput:
    """Everything a successful item produced. The IO manager persists it and the executor makes the
    success transition in the same database transaction."""

    item_id: int
    files: list[FileToStore] = field(default_factory=list)  # files with no row of their own
    updates: dict[str, Any] = field(default_factory=dict)  # columns of the item's own row
    artifacts: list[ArtifactOut] = field(default_factory=list)
    new_clips: list[NewClipOut] = field(default_factory=list)
    embedding: EmbeddingOut | None = None
    # Other rows that change state in the same transaction: (kind, id, from_state, to_state).
    partner_transitions: list[tuple[str, int, str, str]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)  # shown in Dagster
    result: Any = None  # the typed media result, for logs and tests
    thumbnail_jpeg: bytes | None = None


@dataclass
class BatchReport:
    """The outcome of one stage run over many partitions."""

    stage: str
    succeeded: dict[int, ItemOutput] = field(default_factory=dict)
    permanent: dict[int, str] = field(default_factory=dict)
    transient: dict[int, str] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)  # not claimable (done, not ready, not found)
    held: dict[int, str] = field(default_factory=dict)  # skipped: another worker holds the claim
    lost: dict[int, str] = field(default_factory=dict)  # our claim was taken away: nothing committed
    unfinished: dict[int, str] = field(default_factory=dict)  # outcome could not be recorded (database down)
    taken_back: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # a person's run asked for an item it cannot run
    rewound: dict[int, str] = field(default_factory=dict)  # a person's run took these back (from state)  # claims of this run's earlier attempt, taken back
    new_clip_ids: list[int] = field(default_factory=list)
    durations: dict[int, float] = field(default_factory=dict)
