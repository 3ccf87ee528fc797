"""Run the pipeline in this process, the way the Dagster daemon would: tick every stage sensor,
register the partitions it asks for, execute the runs it requests, repeat until nothing is ready.

Used by ``heaters demo`` and the end-to-end tests; production uses ``dagster dev`` / the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import dagster as dg

from heaters_dagster.assets.factory import job_name
from heaters_dagster.stages import STAGES, Stage


@dataclass
class InProcessRun:
    stage: str
    partitions: list[str]
    success: bool
    run_id: str


@dataclass
class PipelineDriver:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    stages: tuple[Stage, ...] = STAGES
    cursors: dict[str, str | None] = field(default_factory=dict)
    log: Callable[[str], None] = lambda _msg: None
    dagster_log_level: str = "WARNING"  # of Dagster's console logger for the in-process runs

    def tick(self, stage: Stage) -> list[dg.RunRequest]:
        sensor = self.defs.resolve_sensor_def(f"{stage.name}_sensor")
        database = self.defs.resources["database"]
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get(stage.name),
                                     resources={"database": database}, definitions=self.defs) as ctx:
            result = sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        for req in result.dynamic_partitions_requests or []:
            if isinstance(req, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        self.cursors[stage.name] = result.cursor
        return list(result.run_requests or [])

    def execute(self, stage: Stage, request: dg.RunRequest) -> InProcessRun:
        job = self.defs.resolve_job_def(job_name(stage))
        tags = dict(request.tags or {})
        res = job.execute_in_process(
            instance=self.instance, partition_key=request.partition_key, tags=tags, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": self.dagster_log_level}}}},
        )
        parts = [request.partition_key] if request.partition_key else [
            tags.get("dagster/asset_partition_range_start", "?"), tags.get("dagster/asset_partition_range_end", "?")]
        self.log(f"{stage.name}: run over {'..'.join(p for p in parts if p)} "
                 f"{'succeeded' if res.success else 'failed'}")
        return InProcessRun(stage.name, [p for p in parts if p], res.success, res.run_id)

    def process_review_events(self) -> None:
        """Tick the review sensor and store what the daemon would: its asset events (the ``review``
        materializations) and its partition requests."""
        sensor = self.defs.resolve_sensor_def("review_events_sensor")
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursors.get("review_events_sensor"),
                                     resources={"database": self.defs.resources["database"]},
                                     definitions=self.defs) as ctx:
            result = sensor(ctx)
        assert isinstance(result, dg.SensorResult)
        for event in result.asset_events or []:
            self.instance.report_runless_asset_event(event)
        for req in result.dynamic_partitions_requests or []:
            if isinstance(req, dg.AddDynamicPartitionsRequest):
                self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        self.cursors["review_events_sensor"] = result.cursor
        for e in result.asset_events or []:
            self.log(f"review {e.partition}: {e.description}")

    def run_until_idle(self, max_rounds: int = 50, stop_at: set[str] | None = None) -> list[InProcessRun]:
        runs: list[InProcessRun] = []
        for _ in range(max_rounds):
            launched = 0
            self.process_review_events()
            for stage in self.stages:
                if stop_at and stage.name in stop_at:
                    continue
                for request in self.tick(stage):
                    runs.append(self.execute(stage, request))
                    launched += 1
            if not launched:
                break
        return runs
