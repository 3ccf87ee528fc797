"""The asset graph's partitions and edges, from the stage table's ``upstream`` fields.

* One dynamic partition set per entity: ``videos`` (ingest, splice) and ``clips`` (sprite,
  review, keyframes, embedding, split, merge, archive). A clip's id is its partition key in every
  clip asset, so an edge between two clip nodes is an exact ``IdentityPartitionMapping``: clip 42
  of ``keyframes`` depends on clip 42 of ``review``.
* The one video -> clip edge (splice -> sprite) cannot be exact in Dagster: which clips a video
  has is data, and Dagster has no built-in mapping between two dynamic partition sets driven by
  data (custom partition mappings are not supported; ``StaticPartitionMapping`` needs static
  sets). The choices are ``AllPartitionMapping`` (every clip depends on every video: any splice
  makes every clip "unsynced" while there are fewer than 100 videos, and Dagster skips the edge
  for staleness past that) or an edge with no partition-level dependency. Heaters uses
  ``SpecificPartitionsPartitionMapping([])``: the Lineage view draws splice -> sprite, and no clip
  goes stale when some video is spliced. Which video a clip came from is in every clip
  materialization's metadata (``source_video_id``) instead.
* Split and merge feed new clips back to sprite -> review. That loop cannot be an edge (an
  asset graph is acyclic): split and merge depend on review, and register their new clips in the
  shared ``clips`` set, where the sprite sensor picks them up.
"""

from __future__ import annotations

import dagster as dg

from heaters_dagster.stages import HumanStep, Stage, node_entity

VIDEOS = dg.DynamicPartitionsDefinition(name="videos")
CLIPS = dg.DynamicPartitionsDefinition(name="clips")
PARTITIONS = {"video": VIDEOS, "clip": CLIPS}

# An edge drawn in the Lineage view with no partition-level dependency (see the module docstring).
VIDEO_TO_CLIP = dg.SpecificPartitionsPartitionMapping([])


def partitions_def_for(node: "Stage | HumanStep | str") -> dg.DynamicPartitionsDefinition:
    entity = node if isinstance(node, str) else node.entity
    return PARTITIONS[entity]


def partition_mapping(upstream_entity: str, downstream_entity: str) -> dg.PartitionMapping:
    if upstream_entity == downstream_entity:
        return dg.IdentityPartitionMapping()
    if (upstream_entity, downstream_entity) == ("video", "clip"):
        return VIDEO_TO_CLIP
    raise ValueError(f"no partition mapping from {upstream_entity} to {downstream_entity} partitions")


def asset_deps(node: "Stage | HumanStep") -> list[dg.AssetDep]:
    """The node's upstream edges, each with its partition mapping."""
    return [dg.AssetDep(up, partition_mapping=partition_mapping(node_entity(up), node.entity))
            for up in node.upstream]


def build_human_step_asset(step: HumanStep) -> dg.AssetSpec:
    """An external asset: shown in the graph, never materialized by a run (the review sensor
    reports its materializations)."""
    return dg.AssetSpec(
        key=step.asset_name, deps=asset_deps(step), partitions_def=partitions_def_for(step),
        group_name="pipeline", description=step.description, kinds={"human"},
        metadata={"entity": step.entity, "recorded_by": "review_events_sensor"},
    )
