"""What the stream worker is configured with: the part of the settings it reads.

The command line fills it from `gpuledger.settings.Settings` (`Settings.worker_config()`);
the worker never reads the environment or the settings itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpuledger.schema.messages import IdleBasis

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    bootstrap: str | None = None
    topic_prefix: str = "gpuledger."
    data_dir: Path = Path(".")
    group_id: str = "gpuledger-worker"
    session_timeout_ms: int = 6000
    grace_s: float = 1.0
    max_hold_wall_s: float = 3.0
    publish_facts: bool = True
    facts_compression: str = "zstd"
    idle_threshold: float = 0.05
    idle_basis: IdleBasis = IdleBasis.busy_time
    idle_alert_after_s: float = 600.0
    idle_resolve_after_s: float = 60.0
    idle_update_every_s: float = 60.0
    idle_rules_file: Path | None = None
    alertmanager_url: str | None = None
    alert_webhook_url: str | None = None
    alert_webhook_slack: bool = False
    alert_retry_max_s: float = 30.0
    alert_resend_s: float = 60.0
    budget_check_s: float = 30.0
    orphan_after_s: float = 900.0

    @property
    def brokers(self) -> str:
        """The bootstrap servers to connect to (the embedded broker's when unset)."""
        return self.bootstrap or DEFAULT_BOOTSTRAP

    @property
    def heartbeat_interval_ms(self) -> int:
        """A sixth of the session timeout, as Kafka advises (at least 100 ms)."""
        return max(self.session_timeout_ms // 6, 100)
