"""The stream worker as a Faust application.

Faust runs the worker's life (start, signals, stop in order); the cost path, samples and
usage events alike, is a service inside it (streams/pipeline.py says why it consumes with
aiokafka).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import faust
import mode

from gpuledger.streams.alerting import alert_observers
from gpuledger.streams.config import WorkerConfig
from gpuledger.streams.pipeline import CostPipeline
from gpuledger.streams.sink import FactSink

log = logging.getLogger("gpuledger.worker")


class PipelineService(mode.Service):
    """Runs the cost pipeline for as long as the app runs; flushes it on stop."""

    def __init__(self, pipeline: CostPipeline, **kwargs: Any) -> None:
        self.pipeline = pipeline
        super().__init__(**kwargs)

    @mode.Service.task
    async def _run(self) -> None:
        try:
            await self.pipeline.run()
        except Exception:
            log.exception("cost pipeline failed; stopping the worker")
            self.set_shutdown()
            raise

    async def on_stop(self) -> None:
        self.pipeline.stop()
        # Give the pipeline its final flush before the loop goes away.
        if self.pipeline.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pipeline.stopped.wait(), timeout=60.0)


def create_app(config: WorkerConfig, client_factory: Any) -> tuple[faust.App, CostPipeline]:
    """The worker app. `client_factory()` returns a clickhouse-connect client."""
    # Faust makes its datadir without parents: on a fresh machine the data folder is missing.
    config.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        config.group_id,
        broker=f"kafka://{config.brokers}",
        store="memory://",
        datadir=str(config.data_dir / "faust"),
        web_enabled=False,
        broker_session_timeout=config.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(config.session_timeout_ms / 6000, 0.1),
        topic_replication_factor=1,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        autodiscover=False,
    )
    pipeline = CostPipeline(config, lambda: FactSink(client_factory()))
    pipeline.observers.extend(alert_observers(config))  # idle and budget alerts
    app.service(PipelineService(pipeline))  # type: ignore[arg-type]
    return app, pipeline
