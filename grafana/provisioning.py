"""Everything Grafana needs, as data: dashboard JSON, alert rules, the ClickHouse data source,
and Grafana's file-provisioning documents for all three. `export(dir)` writes them:

    DIR/dashboards/<uid>.json
    DIR/provisioning/datasources/gpuledger.yaml
    DIR/provisioning/dashboards/gpuledger.yaml
    DIR/provisioning/alerting/gpuledger.yaml

Mount `DIR/provisioning` at `/etc/grafana/provisioning` and `DIR/dashboards` at
`DASHBOARDS_PATH` (deploy/compose.yaml does). Provisioning files never hold a password: the
data source reads it from Grafana's environment (`$GPULEDGER_CLICKHOUSE_PASSWORD`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import alerting as alerting_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

from gpuledger.grafana import alert_rules, clickhouse, cost_explorer, fleet_live
from gpuledger.grafana.board import Board

DASHBOARDS_PATH = "/var/lib/grafana/dashboards/gpuledger"
PASSWORD_ENV = "GPULEDGER_CLICKHOUSE_PASSWORD"
# Grafana reads as the read-only analyst (deploy/clickhouse/create_analyst_user.sh).
DEFAULT_CLICKHOUSE_URL = "clickhouse://gpuledger_analyst@clickhouse:8123/gpuledger"


class ProvisioningError(ValueError):
    """A setting that cannot become a Grafana object; the message says which and why."""


@dataclass(frozen=True)
class ClickHouseEndpoint:
    """Where Grafana's ClickHouse plugin connects (HTTP interface by default)."""

    host: str
    port: int = 8123
    username: str = "default"
    password: str | None = None
    database: str = "gpuledger"
    protocol: str = "http"
    secure: bool = False

    @classmethod
    def from_url(cls, url: str) -> ClickHouseEndpoint:
        """`clickhouse[s]://user[:password]@host[:port]/database` (the GPULEDGER_STORE form);
        `?protocol=native` for the native port. The database is `gpuledger`, which every
        panel's SQL names: another one is refused."""
        from gpuledger.store import DEFAULT_DATABASE, redact_store_url

        parts = urlsplit(url)
        shown = redact_store_url(url)
        if parts.scheme not in ("clickhouse", "clickhouses"):
            raise ProvisioningError(
                f"ClickHouse URL {shown!r}: scheme must be clickhouse:// or clickhouses://, got "
                f"{parts.scheme or 'none'!r}; Grafana cannot reach an embedded chdb:// store "
                "unless it runs on this machine: pass the store's HTTP address as clickhouse://"
            )
        if not parts.hostname:
            raise ProvisioningError(f"ClickHouse URL {shown!r}: no host; write clickhouse://HOST")
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        protocol = query.get("protocol", "http")
        if protocol not in ("http", "native"):
            raise ProvisioningError(
                f"ClickHouse URL {shown!r}: protocol must be http or native, got {protocol!r}"
            )
        database = unquote(parts.path.strip("/")) or DEFAULT_DATABASE
        if database != DEFAULT_DATABASE:
            raise ProvisioningError(
                f"ClickHouse URL {shown!r} names database {database!r}: the dashboards query "
                f"database {DEFAULT_DATABASE!r}; end the URL with /{DEFAULT_DATABASE}"
            )
        secure = parts.scheme == "clickhouses"
        default_port = {("http", False): 8123, ("http", True): 8443}.get(
            (protocol, secure), 9440 if secure else 9000
        )
        return cls(
            host=parts.hostname,
            port=parts.port or default_port,
            username=unquote(parts.username) if parts.username else "default",
            password=unquote(parts.password) if parts.password else None,
            database=database,
            protocol=protocol,
            secure=secure,
        )

    def json_data(self) -> dict[str, Any]:
        """The plugin's (v4) jsonData."""
        return {
            "host": self.host,
            "port": self.port,
            "protocol": self.protocol,
            "secure": self.secure,
            "username": self.username,
            "defaultDatabase": self.database,
        }


def boards(datasource_uid: str = clickhouse.DATASOURCE_UID) -> list[Board]:
    return [fleet_live.build_board(datasource_uid), cost_explorer.build_board(datasource_uid)]


def to_plain(model: Any) -> Any:
    """An SDK model as plain JSON data (what Grafana stores)."""
    return json.loads(json.dumps(model, cls=JSONEncoder))


def dashboard_json(board: Board) -> dict[str, Any]:
    data: dict[str, Any] = to_plain(board.build())
    return data


def load_dashboard(data: dict[str, Any]) -> dashboard_models.Dashboard:
    """Dashboard JSON read back into the SDK's model (ClickHouse targets typed)."""
    clickhouse.register()
    return dashboard_models.Dashboard.from_json(data)


def load_rule(data: dict[str, Any]) -> alerting_models.Rule:
    clickhouse.register()
    return alerting_models.Rule.from_json(data)


def rules_json(
    *,
    team_usd_per_hour: float = 500.0,
    datasource_uid: str = clickhouse.DATASOURCE_UID,
    folder_uid: str = alert_rules.FOLDER_UID,
) -> list[dict[str, Any]]:
    """Alert rules in the provisioning HTTP API's shape (ProvisionedAlertRule)."""
    return [
        to_plain(rule)
        for rule in alert_rules.build_rules(
            team_usd_per_hour=team_usd_per_hour,
            datasource_uid=datasource_uid,
            folder_uid=folder_uid,
        )
    ]


def datasource_payload(
    endpoint: ClickHouseEndpoint, *, uid: str = clickhouse.DATASOURCE_UID
) -> dict[str, Any]:
    """The body of `POST /api/datasources` and `PUT /api/datasources/uid/:uid`."""
    payload: dict[str, Any] = {
        "uid": uid,
        "name": clickhouse.DATASOURCE_NAME,
        "type": clickhouse.PLUGIN_ID,
        "access": "proxy",
        "isDefault": False,
        "jsonData": endpoint.json_data(),
    }
    if endpoint.password is not None:
        payload["secureJsonData"] = {"password": endpoint.password}
    return payload


def datasource_provisioning(
    endpoint: ClickHouseEndpoint, *, uid: str = clickhouse.DATASOURCE_UID
) -> dict[str, Any]:
    source = datasource_payload(endpoint, uid=uid)
    source.pop("secureJsonData", None)
    source["editable"] = False
    source["secureJsonData"] = {"password": f"${PASSWORD_ENV}"}
    return {"apiVersion": 1, "datasources": [source]}


def dashboard_provider(path: str = DASHBOARDS_PATH) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "gpuledger",
                "orgId": alert_rules.ORG_ID,
                "folder": alert_rules.FOLDER_TITLE,
                "folderUid": alert_rules.FOLDER_UID,
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 60,
                "options": {"path": path, "foldersFromFilesStructure": False},
            }
        ],
    }


# Fields of a ProvisionedAlertRule that the file format names the same way.
_FILE_RULE_FIELDS = (
    "uid",
    "title",
    "condition",
    "data",
    "noDataState",
    "execErrState",
    "for",
    "annotations",
    "labels",
)


def escape_dollars(value: Any) -> Any:
    """`$` → `$$` in every string: Grafana expands `$NAME` in provisioning files from its
    environment, which would eat `$labels`, `$values` and the plugin's `$__` macros."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, list):
        return [escape_dollars(v) for v in value]
    if isinstance(value, dict):
        return {k: escape_dollars(v) for k, v in value.items()}
    return value


def alerting_provisioning(rules: list[dict[str, Any]]) -> dict[str, Any]:
    """Grafana's alerting file-provisioning document for one rule group (`$` escaped)."""
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": alert_rules.ORG_ID,
                "name": alert_rules.GROUP,
                "folder": alert_rules.FOLDER_TITLE,
                "interval": f"{alert_rules.GROUP_INTERVAL_S}s",
                "rules": [
                    escape_dollars({k: rule[k] for k in _FILE_RULE_FIELDS if k in rule})
                    | {"isPaused": False}
                    for rule in rules
                ],
            }
        ],
    }


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _yaml(data: Any) -> str:
    header = "# Generated by `gpuledger grafana export`; edit the Python in grafana/, not this.\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def export(
    directory: Path,
    *,
    endpoint: ClickHouseEndpoint,
    team_usd_per_hour: float = 500.0,
    datasource_uid: str = clickhouse.DATASOURCE_UID,
    dashboards_path: str = DASHBOARDS_PATH,
) -> list[Path]:
    """Write dashboards, rules and provisioning files under `directory`; return the paths."""
    written: list[Path] = []
    for board in boards(datasource_uid):
        text = json.dumps(dashboard_json(board), indent=2, sort_keys=False) + "\n"
        written.append(_write(directory / "dashboards" / f"{board.uid}.json", text))
    provisioning = directory / "provisioning"
    written.append(
        _write(
            provisioning / "datasources" / "gpuledger.yaml",
            _yaml(datasource_provisioning(endpoint, uid=datasource_uid)),
        )
    )
    written.append(
        _write(
            provisioning / "dashboards" / "gpuledger.yaml",
            _yaml(dashboard_provider(dashboards_path)),
        )
    )
    rules = rules_json(team_usd_per_hour=team_usd_per_hour, datasource_uid=datasource_uid)
    written.append(
        _write(provisioning / "alerting" / "gpuledger.yaml", _yaml(alerting_provisioning(rules)))
    )
    return written
