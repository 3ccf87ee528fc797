"""The state machine of source videos and clips: states, legal transitions, failure states.

Every state change in Heaters goes through :func:`transition` (or :func:`transition_many`): one
conditional ``UPDATE ... WHERE id = :id AND state IN (:expected)``. If another worker got there
first the update matches no row and :class:`~heaters_dagster.errors.ClaimConflictError` is raised,
so two workers can never claim the same item. Asking for a change the table below does not allow
raises :class:`~heaters_dagster.errors.IllegalTransitionError` before touching the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from sqlalchemy import func, text, update
from sqlalchemy.orm import Session

from heaters_dagster.errors import ClaimConflictError, IllegalTransitionError


class VideoState:
    NEW = "new"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    SPLICING = "splicing"
    SPLICED = "spliced"
    INGESTION_FAILED = "ingestion_failed"
    SPLICING_FAILED = "splicing_failed"


class ClipState:
    SPLICED = "spliced"
    GENERATING_SPRITE = "generating_sprite"
    PENDING_REVIEW = "pending_review"
    REVIEW_APPROVED = "review_approved"
    REVIEW_SKIPPED = "review_skipped"
    REVIEW_ARCHIVED = "review_archived"
    SPLIT_PENDING = "split_pending"
    MERGE_PENDING = "merge_pending"
    SPLITTING = "splitting"
    MERGING = "merging"
    KEYFRAMING = "keyframing"
    KEYFRAMED = "keyframed"
    EMBEDDING = "embedding"
    EMBEDDED = "embedded"
    ARCHIVING = "archiving"
    ARCHIVED = "archived"
    SPRITE_FAILED = "sprite_failed"
    KEYFRAME_FAILED = "keyframe_failed"
    EMBEDDING_FAILED = "embedding_failed"
    ARCHIVE_FAILED = "archive_failed"
    SPLIT_FAILED = "split_failed"
    MERGE_FAILED = "merge_failed"


V, C = VideoState, ClipState

VIDEO_TRANSITIONS: dict[str, frozenset[str]] = {
    V.NEW: frozenset({V.DOWNLOADING, V.INGESTION_FAILED}),
    V.DOWNLOADING: frozenset({V.DOWNLOADED, V.INGESTION_FAILED, V.NEW}),  # -> new: transient retry
    V.DOWNLOADED: frozenset({V.SPLICING, V.SPLICING_FAILED}),
    V.SPLICING: frozenset({V.SPLICED, V.SPLICING_FAILED, V.DOWNLOADED}),  # -> downloaded: retry
    V.SPLICED: frozenset(),
    V.INGESTION_FAILED: frozenset({V.NEW, V.DOWNLOADING}),  # retrying from a failed state is legal
    V.SPLICING_FAILED: frozenset({V.DOWNLOADED, V.SPLICING}),
}

_REVIEW_DECISIONS = {C.REVIEW_APPROVED, C.REVIEW_SKIPPED, C.REVIEW_ARCHIVED, C.SPLIT_PENDING, C.MERGE_PENDING}
# Undo returns a clip to where the reviewer found it.
_UNDO_TARGETS = {C.PENDING_REVIEW, C.REVIEW_SKIPPED, C.REVIEW_APPROVED}

CLIP_TRANSITIONS: dict[str, frozenset[str]] = {
    C.SPLICED: frozenset({C.GENERATING_SPRITE, C.SPRITE_FAILED, C.REVIEW_ARCHIVED}),
    C.GENERATING_SPRITE: frozenset({C.PENDING_REVIEW, C.SPRITE_FAILED, C.SPLICED}),
    C.PENDING_REVIEW: frozenset(_REVIEW_DECISIONS),
    # Review decisions can be undone (back to pending_review) or changed by the reviewer.
    C.REVIEW_APPROVED: frozenset({C.PENDING_REVIEW, C.REVIEW_SKIPPED, C.KEYFRAMING, C.KEYFRAME_FAILED,
                                  C.MERGE_PENDING}),
    C.REVIEW_SKIPPED: frozenset(_REVIEW_DECISIONS | {C.PENDING_REVIEW}),
    C.REVIEW_ARCHIVED: frozenset(_UNDO_TARGETS | {C.ARCHIVING, C.ARCHIVE_FAILED}),
    C.SPLIT_PENDING: frozenset(_UNDO_TARGETS | {C.SPLITTING, C.SPLIT_FAILED}),
    # A merge's target is archived in the same transaction that creates the merged clip.
    C.MERGE_PENDING: frozenset(_UNDO_TARGETS | {C.MERGING, C.MERGE_FAILED, C.REVIEW_ARCHIVED}),
    C.SPLITTING: frozenset({C.REVIEW_ARCHIVED, C.SPLIT_FAILED, C.SPLIT_PENDING}),
    C.MERGING: frozenset({C.REVIEW_ARCHIVED, C.MERGE_FAILED, C.MERGE_PENDING}),
    C.KEYFRAMING: frozenset({C.KEYFRAMED, C.KEYFRAME_FAILED, C.REVIEW_APPROVED}),
    C.KEYFRAMED: frozenset({C.EMBEDDING, C.EMBEDDING_FAILED, C.REVIEW_APPROVED}),
    C.EMBEDDING: frozenset({C.EMBEDDED, C.EMBEDDING_FAILED, C.KEYFRAMED}),
    C.EMBEDDED: frozenset({C.KEYFRAMED, C.REVIEW_APPROVED}),  # re-queue: re-embed or re-keyframe
    C.ARCHIVING: frozenset({C.ARCHIVED, C.ARCHIVE_FAILED, C.REVIEW_ARCHIVED}),
    C.ARCHIVED: frozenset(),
    C.SPRITE_FAILED: frozenset({C.SPLICED, C.GENERATING_SPRITE}),
    C.KEYFRAME_FAILED: frozenset({C.REVIEW_APPROVED, C.KEYFRAMING}),
    C.EMBEDDING_FAILED: frozenset({C.KEYFRAMED, C.EMBEDDING}),
    C.ARCHIVE_FAILED: frozenset({C.REVIEW_ARCHIVED, C.ARCHIVING}),
    C.SPLIT_FAILED: frozenset({C.PENDING_REVIEW, C.SPLIT_PENDING}),
    C.MERGE_FAILED: frozenset({C.PENDING_REVIEW, C.MERGE_PENDING}),
}

VIDEO_STATES: tuple[str, ...] = tuple(VIDEO_TRANSITIONS)
CLIP_STATES: tuple[str, ...] = tuple(CLIP_TRANSITIONS)
VIDEO_FAILED_STATES = frozenset({V.INGESTION_FAILED, V.SPLICING_FAILED})
CLIP_FAILED_STATES = frozenset(
    {C.SPRITE_FAILED, C.KEYFRAME_FAILED, C.EMBEDDING_FAILED, C.ARCHIVE_FAILED, C.SPLIT_FAILED, C.MERGE_FAILED}
)
#: Clips whose frames still belong to the live cut of their source (everything but archived ones
#: and the originals of a split/merge that has been carried out).
CLIP_DEAD_STATES = frozenset({C.REVIEW_ARCHIVED, C.ARCHIVING, C.ARCHIVED, C.ARCHIVE_FAILED})

TRANSITIONS: dict[str, dict[str, frozenset[str]]] = {"video": VIDEO_TRANSITIONS, "clip": CLIP_TRANSITIONS}


def check_legal(kind: str, from_states: Iterable[str], to_state: str) -> None:
    table = TRANSITIONS[kind]
    if to_state not in table:
        raise IllegalTransitionError(f"unknown {kind} state {to_state!r}")
    for s in from_states:
        if s not in table:
            raise IllegalTransitionError(f"unknown {kind} state {s!r}")
        if to_state not in table[s]:
            allowed = ", ".join(sorted(table[s])) or "none (terminal state)"
            raise IllegalTransitionError(
                f"illegal {kind} transition {s} -> {to_state}; allowed from {s}: {allowed}"
            )


@dataclass(frozen=True)
class TransitionResult:
    id: int
    from_state: str
    to_state: str


def _model(kind: str) -> Any:
    from heaters_dagster.database.models import Clip, SourceVideo

    return {"video": SourceVideo, "clip": Clip}[kind]


def transition(
    session: Session,
    kind: str,
    item_id: int,
    expected: str | Iterable[str],
    to_state: str,
    *,
    error: str | None = None,
    clear_error: bool = False,
    bump_retry: bool = False,
    bump_version: bool = False,
    values: Mapping[str, Any] | None = None,
    condition: str | None = None,
) -> TransitionResult:
    """Move one item from one of ``expected`` to ``to_state`` atomically.

    ``error`` sets ``last_error``; ``bump_retry`` increments ``retry_count``; ``bump_version``
    increments ``version`` (a deliberate re-queue, so sensors request the item again); ``values``
    sets other columns in the same statement. Raises IllegalTransitionError for a transition the
    table forbids and ClaimConflictError when the row is not (or no longer) in an expected state.
    """
    expected_states = (expected,) if isinstance(expected, str) else tuple(expected)
    check_legal(kind, expected_states, to_state)
    model = _model(kind)
    sets: dict[str, Any] = {"state": to_state, "updated_at": func.now()}
    if error is not None:
        sets["last_error"] = error[:4000]
    elif clear_error:
        sets["last_error"] = None
    if bump_retry:
        sets["retry_count"] = model.retry_count + 1
    if bump_version:
        sets["version"] = model.version + 1
    if values:
        sets.update(values)
    stmt = (
        update(model)
        .where(model.id == item_id, model.state.in_(expected_states),
               *([text(condition)] if condition else []))
        .values(**sets)
        .returning(model.id)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    if row is None:
        current = session.execute(
            _select_state(model, item_id)
        ).scalar_one_or_none()
        if current is None:
            raise ClaimConflictError(f"{kind} {item_id} does not exist")
        if condition and current in expected_states:
            raise ClaimConflictError(f"{kind} {item_id} is not ready yet ({condition})")
        raise ClaimConflictError(
            f"{kind} {item_id} is in state {current!r}, expected {' or '.join(expected_states)}"
        )
    return TransitionResult(item_id, "|".join(expected_states), to_state)


def _select_state(model: Any, item_id: int) -> Any:
    from sqlalchemy import select

    return select(model.state).where(model.id == item_id)
