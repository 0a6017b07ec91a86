"""Push the folder, the ClickHouse data source, the dashboards and the alert rules to a
Grafana server through its HTTP API (`grafana-client`), idempotently: every object has a
fixed uid, so a second run updates what the first created and never duplicates it.

Endpoints used (Grafana HTTP API): `GET /api/frontend/settings` (grafana-client's health
check); `GET|POST /api/folders`,
`PUT /api/folders/:uid`; `GET /api/datasources/uid/:uid`, `POST /api/datasources`,
`PUT /api/datasources/uid/:uid`; `GET /api/dashboards/uid/:uid`, `POST /api/dashboards/db`
(overwrite by uid);
`GET|PUT /api/v1/provisioning/alert-rules/:uid`, `POST /api/v1/provisioning/alert-rules`,
`PUT /api/v1/provisioning/folder/:uid/rule-groups/:group` (the group's interval).
Not run against a live Grafana here: tests use a local server that checks each request
against the documented API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

from gpuledger.grafana import alert_rules
from gpuledger.grafana.board import Board
from gpuledger.grafana.provisioning import ClickHouseEndpoint, dashboard_json, datasource_payload

MESSAGE = "gpuledger grafana sync"
UNAUTHORIZED = (
    "Grafana answered 401 Unauthorized: give a service account token with the Admin role "
    "(data sources need it) as --token or GRAFANA_TOKEN"
)


class SyncError(RuntimeError):
    """Grafana refused something; the message names the object and what to do."""


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.created)} created, {len(self.updated)} updated"


def _status(exc: GrafanaException) -> int | None:
    return getattr(exc, "status_code", None)


def _missing(call: Callable[[], Any]) -> Any | None:
    """The object `call` fetches, or None when Grafana answers 404."""
    try:
        return call()
    except GrafanaClientError as exc:
        if _status(exc) == 404:
            return None
        raise


def _ensure_folder(api: GrafanaApi, uid: str, title: str, report: SyncReport) -> None:
    folder = _missing(lambda: api.folder.get_folder(uid))
    if folder is None:
        api.folder.create_folder(title, uid=uid)
        report.created.append(f"folder {uid}")
    elif folder.get("title") != title:
        api.folder.update_folder(uid, title=title, overwrite=True)
        report.updated.append(f"folder {uid}")


def _ensure_datasource(api: GrafanaApi, payload: dict[str, Any], report: SyncReport) -> None:
    uid = payload["uid"]
    current = _missing(lambda: api.datasource.get_datasource_by_uid(uid))
    try:
        if current is None:
            api.datasource.create_datasource(payload)
            report.created.append(f"datasource {uid}")
        else:
            api.datasource.update_datasource_by_uid(uid, payload)
            report.updated.append(f"datasource {uid}")
    except GrafanaClientError as exc:
        if _status(exc) == 409:
            raise SyncError(
                f"data source {payload['name']!r}: Grafana already has a data source of that "
                f"name with another uid; rename or delete it, then sync again ({exc})"
            ) from exc
        raise


def _push_dashboard(api: GrafanaApi, board: Board, folder_uid: str, report: SyncReport) -> None:
    dashboard = dashboard_json(board)
    dashboard["id"] = None  # by uid: Grafana finds the existing one and overwrites it
    existed = _missing(lambda: api.dashboard.get_dashboard(board.uid)) is not None
    api.dashboard.update_dashboard(
        {"dashboard": dashboard, "folderUid": folder_uid, "overwrite": True, "message": MESSAGE}
    )
    (report.updated if existed else report.created).append(f"dashboard {board.uid}")


def _push_rules(
    api: GrafanaApi, rules: list[dict[str, Any]], folder_uid: str, report: SyncReport
) -> None:
    for rule in rules:
        uid: str = rule["uid"]
        if _missing(partial(api.alertingprovisioning.get_alertrule, uid)) is None:
            api.alertingprovisioning.create_alertrule(rule)
            report.created.append(f"alert rule {uid}")
        else:
            api.alertingprovisioning.update_alertrule(uid, rule)
            report.updated.append(f"alert rule {uid}")
    group = {
        "title": alert_rules.GROUP,
        "folderUid": folder_uid,
        "interval": alert_rules.GROUP_INTERVAL_S,
        "rules": rules,
    }
    api.alertingprovisioning.update_rule_group(folder_uid, alert_rules.GROUP, group)


def sync(
    api: GrafanaApi,
    *,
    endpoint: ClickHouseEndpoint,
    boards: list[Board],
    rules: list[dict[str, Any]],
    folder_uid: str = alert_rules.FOLDER_UID,
    folder_title: str = alert_rules.FOLDER_TITLE,
) -> SyncReport:
    """Create or update everything; Grafana's own errors surface as SyncError."""
    report = SyncReport()
    try:
        api.health.check()
    except GrafanaException as exc:
        if _status(exc) == 401:
            raise SyncError(UNAUTHORIZED) from exc
        raise SyncError(
            f"Grafana at {api.url or api.client.url}: health check failed: {exc}"
        ) from exc
    except Exception as exc:
        raise SyncError(
            f"Grafana at {api.url or api.client.url} is not reachable ({exc}); check --url"
        ) from exc
    datasource_uids = {b.datasource_uid for b in boards}
    if len(datasource_uids) > 1:
        raise SyncError(f"boards use several data sources {sorted(datasource_uids)}; use one")
    try:
        _ensure_folder(api, folder_uid, folder_title, report)
        for uid in datasource_uids:
            _ensure_datasource(api, datasource_payload(endpoint, uid=uid), report)
        for board in boards:
            _push_dashboard(api, board, folder_uid, report)
        _push_rules(api, rules, folder_uid, report)
    except GrafanaException as exc:
        if _status(exc) == 401:
            raise SyncError(UNAUTHORIZED) from exc
        raise SyncError(f"Grafana refused the sync: {exc}") from exc
    return report


def connect(url: str, token: str | None, timeout_s: float = 10.0) -> GrafanaApi:
    """A grafana-client API for `url` (http[s]://host:port[/prefix]) with a bearer token."""
    return GrafanaApi.from_url(url=url, credential=token, timeout=timeout_s)
