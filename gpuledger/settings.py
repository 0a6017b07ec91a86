"""Every setting, from `GPULEDGER_*` environment variables or flags (pydantic-settings)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpuledger.schema.cluster import check_cluster_name
from gpuledger.schema.messages import IdleBasis
from gpuledger.streams.config import WorkerConfig


def default_data_dir() -> Path:
    """Where the embedded store keeps its chdb folder unless told otherwise."""
    import os

    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gpuledger"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPULEDGER_", extra="ignore")

    bootstrap: str | None = Field(
        default=None,
        description="Kafka bootstrap servers (host:port,...); unset = the embedded broker that "
        "`gpuledger up` or `gpuledger broker` runs",
    )
    store: str | None = Field(
        default=None,
        description="chdb:///PATH (embedded store) or "
        "clickhouse://user:password@host:8123/gpuledger; unset = chdb under the data folder",
    )
    store_cluster: str | None = Field(
        default=None,
        description="the ClickHouse cluster the store's schema was made for (`db migrate "
        "--cluster`): writes wait for every shard, and a GPU's rows are read from its shard",
    )
    topic_prefix: str = Field(default="gpuledger.", description="prefix of every topic name")
    data_dir: Path = Field(default_factory=default_data_dir, description="local state folder")
    session_timeout_ms: int = Field(
        default=6000, description="Kafka consumer group session timeout (short = fast joins)"
    )
    grace_s: float = Field(
        default=1.0, description="event-time grace a sample waits for metadata that races it"
    )
    max_hold_wall_s: float = Field(
        default=3.0, description="wall seconds a sample is held at most when a partition is quiet"
    )
    idle_threshold: float = Field(default=0.05, ge=0.0, le=1.0)
    idle_basis: IdleBasis = Field(
        default=IdleBasis.busy_time,
        description="what idle cost and idleness are judged by: busy_time (NVML's share of "
        "time any kernel ran) or sm_active (GPM's share of SMs busy, where the GPU has GPM)",
    )
    idle_alert_after_s: float = Field(default=600.0, gt=0.0)
    orphan_after_s: float = Field(
        default=900.0,
        gt=0.0,
        description="seconds a process holds GPU memory with no live job before it is alerted",
    )
    idle_resolve_after_s: float = Field(
        default=60.0,
        gt=0.0,
        description="busy seconds that end an idle episode (hysteresis: a blip does not)",
    )
    idle_update_every_s: float = Field(
        default=60.0,
        ge=0.0,
        description="event seconds between the updates of a firing idle alert (0 = none)",
    )
    idle_rules_file: Path | None = Field(
        default=None, description="TOML of per team / job type idle thresholds"
    )
    alertmanager_url: str | None = Field(
        default=None, description="Alertmanager base URL (http://host:9093); unset = none"
    )
    alert_webhook_url: str | None = Field(
        default=None, description="URL that receives alerts as JSON POSTs; unset = none"
    )
    alert_webhook_slack: bool = Field(
        default=False, description='post {"text": ...} (Slack incoming webhook) to the webhook'
    )
    alert_retry_max_s: float = Field(
        default=30.0, gt=0.0, description="longest wait between delivery retries"
    )
    alert_resend_s: float = Field(
        default=60.0, gt=0.0, description="wall seconds between re-sends of firing alerts"
    )
    budget_check_s: float = Field(
        default=30.0, gt=0.0, description="wall seconds between budget evaluations"
    )
    interval_s: float = Field(
        default=1.0, gt=0.0, description="agent sampling interval (`gpuledger agent --interval`)"
    )
    publish_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        description="seconds a publishing command (jobs, prices, replay) waits for the broker "
        "to acknowledge its records",
    )
    group_id: str = Field(default="gpuledger-worker", description="worker consumer group")
    publish_facts: bool = Field(
        default=True,
        description="publish every cost fact to the facts topic too (a live feed; the store "
        "is the record), in batches: a few µs of worker CPU a fact",
    )
    facts_compression: Literal["zstd", "lz4", "snappy", "gzip", "none"] = Field(
        default="zstd",
        description="compression of the facts topic's batches; zstd costs ~1 µs a fact, "
        "aiokafka's lz4 (level 9) ~6 µs; kafka-python consumers of zstd need `zstandard`",
    )
    guard_policies: Path | None = Field(
        default=None, description="the guard's policies file (TOML, `gpuledger policies check`)"
    )
    guard_check_s: float = Field(
        default=30.0, gt=0.0, description="seconds between the guard's rounds over idle GPUs"
    )
    guard_kill_switch: bool = Field(
        default=False, description="the guard carries out nothing: every act step is a dry run"
    )

    @field_validator("store_cluster")
    @classmethod
    def _cluster_name(cls, value: str | None) -> str | None:
        return None if value is None else check_cluster_name(value)

    @field_validator("store")
    @classmethod
    def _absolute_chdb_path(cls, value: str | None) -> str | None:
        # chdb://tmp/x reads as a host "tmp": a relative folder would land wherever the
        # command happens to run.
        if value and value.startswith("chdb://") and not value.startswith("chdb:///"):
            rest = value.removeprefix("chdb://")
            raise ValueError(
                f"{value!r} names a relative folder; write an absolute one: "
                f"chdb://{Path(rest).resolve()} (three slashes after chdb:)"
            )
        return value

    def store_url(self) -> str:
        if self.store:
            return self.store
        return f"chdb://{(self.data_dir / 'store').resolve()}"

    def worker_config(self) -> WorkerConfig:
        """What the stream worker reads of the settings."""
        return WorkerConfig(**{f.name: getattr(self, f.name) for f in fields(WorkerConfig)})
