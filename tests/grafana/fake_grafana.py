"""A small stand-in for Grafana's HTTP API, run on 127.0.0.1 by the sync tests.

It keeps folders, data sources, dashboards and alert rules in memory and checks every
request against Grafana's documented HTTP API (grafana.com/docs/grafana/latest/developers/
http_api/: folder, data_source, dashboard, alerting_provisioning): the path and method, a
bearer token, a JSON body, the required fields and their values, and the references between
objects (a dashboard's or rule's folder must exist, a rule's data source must exist, a rule's
condition must name one of its queries). `GET /api/frontend/settings` is answered too: it is
not on the API pages, but grafana-client's health check reads its `buildInfo`. A request
that breaks a rule is answered 400 with the reason and recorded in `violations`, so a test
can assert there are none.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

UID = re.compile(r"^[a-zA-Z0-9\-_]{1,40}$")
NO_DATA_STATES = {"Alerting", "NoData", "OK"}
EXEC_ERR_STATES = {"OK", "Alerting", "Error"}
RULE_FIELDS = (
    "title", "condition", "data", "folderUID", "ruleGroup", "for", "noDataState",
    "execErrState", "orgID",
)  # fmt: skip


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class GrafanaState:
    token: str
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id


def _need(body: dict[str, Any], *names: str, where: str) -> None:
    missing = [n for n in names if n not in body or body[n] in (None, "")]
    if missing:
        raise Refused(400, f"{where}: missing required field(s) {', '.join(missing)}")


def _check_uid(uid: str, where: str) -> None:
    if not UID.match(uid):
        raise Refused(400, f"{where}: uid {uid!r} must be 1-40 of [a-zA-Z0-9-_]")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.command in ("POST", "PUT"):
            if not self.headers.get("Content-Type", "").startswith("application/json"):
                raise Refused(400, f"{self.command} {self.path}: Content-Type must be JSON")
            try:
                body = json.loads(raw or b"null")
            except ValueError as exc:
                raise Refused(400, f"{self.command} {self.path}: body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise Refused(400, f"{self.command} {self.path}: body must be a JSON object")
            return body
        return {}

    def _handle(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        state.requests.append((self.command, path))
        try:
            body = self._body()
            if path != "/api/health" and self.headers.get("Authorization") != (
                f"Bearer {state.token}"
            ):
                raise Refused(401, "Unauthorized")
            status, payload = route(state, self.command, path, body, dict(self.headers))
        except Refused as exc:
            if exc.status not in (401, 404):
                state.violations.append(f"{self.command} {path}: {exc}")
            status, payload = exc.status, {"message": str(exc)}
        self._answer(status, payload)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: GrafanaState


def route(
    state: GrafanaState, method: str, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, Any]:
    if (method, path) == ("GET", "/api/health"):
        return 200, {"commit": "fake", "database": "ok", "version": "11.3.0"}
    if (method, path) == ("GET", "/api/frontend/settings"):
        # Not on the HTTP API pages, but what grafana-client's health check reads.
        return 200, {"buildInfo": {"version": "11.3.0", "commit": "fake", "env": "production"}}
    if (method, path) == ("POST", "/api/folders"):
        return _create_folder(state, body)
    if m := re.fullmatch(r"/api/folders/([^/]+)", path):
        return _folder(state, method, m.group(1), body)
    if (method, path) == ("POST", "/api/datasources"):
        return _create_datasource(state, body)
    if m := re.fullmatch(r"/api/datasources/uid/([^/]+)", path):
        return _datasource(state, method, m.group(1), body)
    if (method, path) == ("POST", "/api/dashboards/db"):
        return _save_dashboard(state, body)
    if method == "GET" and (m := re.fullmatch(r"/api/dashboards/uid/([^/]+)", path)):
        found = state.dashboards.get(m.group(1))
        if found is None:
            raise Refused(404, "Dashboard not found")
        return 200, {"dashboard": found["dashboard"], "meta": {"folderUid": found["folderUid"]}}
    if (method, path) == ("POST", "/api/v1/provisioning/alert-rules"):
        return _create_rule(state, body, headers)
    if m := re.fullmatch(r"/api/v1/provisioning/alert-rules/([^/]+)", path):
        return _rule(state, method, m.group(1), body)
    if method == "PUT" and (
        m := re.fullmatch(r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)", path)
    ):
        return _rule_group(state, m.group(1), m.group(2), body)
    raise Refused(400, f"{method} {path} is not an endpoint of Grafana's HTTP API")


def _create_folder(state: GrafanaState, body: dict[str, Any]) -> tuple[int, Any]:
    _need(body, "title", where="POST /api/folders")
    uid = body.get("uid") or f"f{state.new_id()}"
    _check_uid(uid, "POST /api/folders")
    if uid in state.folders:
        raise Refused(409, f"a folder with uid {uid} already exists")
    folder = {"id": state.new_id(), "uid": uid, "title": body["title"], "version": 1}
    state.folders[uid] = folder
    return 200, folder


def _folder(state: GrafanaState, method: str, uid: str, body: dict[str, Any]) -> tuple[int, Any]:
    folder = state.folders.get(uid)
    if folder is None:
        raise Refused(404, "folder not found")
    if method == "GET":
        return 200, folder
    if method == "PUT":
        _need(body, "title", where=f"PUT /api/folders/{uid}")
        if not body.get("overwrite") and body.get("version") != folder["version"]:
            raise Refused(412, "the folder has been changed by someone else (version)")
        folder.update(title=body["title"], version=folder["version"] + 1)
        return 200, folder
    raise Refused(400, f"{method} /api/folders/{uid} is not supported")


def _check_datasource(body: dict[str, Any], where: str) -> None:
    _need(body, "name", "type", "access", where=where)
    if body["access"] not in ("proxy", "direct"):
        raise Refused(400, f"{where}: access must be proxy or direct, got {body['access']!r}")
    if body["type"] == "grafana-clickhouse-datasource":
        json_data = body.get("jsonData") or {}
        _need(json_data, "host", "port", "protocol", where=f"{where} jsonData")
        if json_data["protocol"] not in ("http", "native"):
            raise Refused(400, f"{where}: jsonData.protocol must be http or native")


def _create_datasource(state: GrafanaState, body: dict[str, Any]) -> tuple[int, Any]:
    _check_datasource(body, "POST /api/datasources")
    uid = body.get("uid") or f"ds{state.new_id()}"
    _check_uid(uid, "POST /api/datasources")
    if any(ds["name"] == body["name"] for ds in state.datasources.values()):
        raise Refused(409, "data source with the same name already exists")
    if uid in state.datasources:
        raise Refused(409, "data source with the same uid already exists")
    source = {**body, "uid": uid, "id": state.new_id(), "version": 1}
    state.datasources[uid] = source
    return 200, {"datasource": source, "id": source["id"], "message": "Datasource added",
                 "name": source["name"]}  # fmt: skip


def _datasource(
    state: GrafanaState, method: str, uid: str, body: dict[str, Any]
) -> tuple[int, Any]:
    source = state.datasources.get(uid)
    if source is None:
        raise Refused(404, "Data source not found")
    if method == "GET":
        return 200, {k: v for k, v in source.items() if k != "secureJsonData"}
    if method == "PUT":
        _check_datasource(body, f"PUT /api/datasources/uid/{uid}")
        source.update(body, version=source["version"] + 1, uid=uid)
        return 200, {"datasource": source, "id": source["id"], "message": "Datasource updated",
                     "name": source["name"]}  # fmt: skip
    raise Refused(400, f"{method} /api/datasources/uid/{uid} is not supported")


def _save_dashboard(state: GrafanaState, body: dict[str, Any]) -> tuple[int, Any]:
    where = "POST /api/dashboards/db"
    _need(body, "dashboard", where=where)
    dashboard = body["dashboard"]
    _need(dashboard, "title", "uid", where=f"{where} dashboard")
    uid = dashboard["uid"]
    _check_uid(uid, where)
    folder_uid = body.get("folderUid")
    if folder_uid and folder_uid not in state.folders:
        raise Refused(400, f"{where}: folder {folder_uid} not found")
    existing = state.dashboards.get(uid)
    if dashboard.get("id") is not None and (
        existing is None or existing["dashboard"]["id"] != dashboard["id"]
    ):
        raise Refused(404, f"{where}: dashboard id {dashboard['id']} not found")
    if (
        existing is not None
        and not body.get("overwrite")
        and dashboard.get("version") != existing["version"]
    ):
        raise Refused(412, "version-mismatch")
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            ref = target.get("datasource", {}).get("uid")
            if ref not in state.datasources:
                raise Refused(400, f"{where}: panel {panel.get('title')!r} uses unknown "
                                   f"data source {ref!r}")  # fmt: skip
    version = 1 if existing is None else existing["version"] + 1
    ident = state.new_id() if existing is None else existing["dashboard"]["id"]
    stored = {**dashboard, "id": ident, "version": version}
    state.dashboards[uid] = {"dashboard": stored, "version": version, "folderUid": folder_uid}
    return 200, {"id": ident, "uid": uid, "url": f"/d/{uid}/x", "status": "success",
                 "version": version, "slug": "x"}  # fmt: skip


def _check_rule(state: GrafanaState, body: dict[str, Any], where: str) -> None:
    _need(body, *RULE_FIELDS, where=where)
    if body["noDataState"] not in NO_DATA_STATES:
        raise Refused(400, f"{where}: noDataState {body['noDataState']!r}")
    if body["execErrState"] not in EXEC_ERR_STATES:
        raise Refused(400, f"{where}: execErrState {body['execErrState']!r}")
    if body["folderUID"] not in state.folders:
        raise Refused(400, f"{where}: folder {body['folderUID']} not found")
    if not re.fullmatch(r"\d+[smhd]", str(body["for"])):
        raise Refused(400, f"{where}: for must be a duration like 5m, got {body['for']!r}")
    ref_ids = []
    for query in body["data"]:
        _need(query, "refId", "datasourceUid", "model", "relativeTimeRange", where=f"{where} data")
        if query["datasourceUid"] != "__expr__" and query["datasourceUid"] not in state.datasources:
            raise Refused(400, f"{where}: data source {query['datasourceUid']} not found")
        span = query["relativeTimeRange"]
        if not (isinstance(span.get("from"), int) and isinstance(span.get("to"), int)):
            raise Refused(400, f"{where}: relativeTimeRange needs integer from and to seconds")
        ref_ids.append(query["refId"])
    if body["condition"] not in ref_ids:
        raise Refused(400, f"{where}: condition {body['condition']!r} is not one of {ref_ids}")


def _create_rule(
    state: GrafanaState, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, Any]:
    where = "POST /api/v1/provisioning/alert-rules"
    _check_rule(state, body, where)
    uid = body.get("uid") or f"r{state.new_id()}"
    _check_uid(uid, where)
    if uid in state.rules:
        raise Refused(409, f"{where}: a rule with uid {uid} already exists")
    rule = {**body, "uid": uid, "id": state.new_id(), "provenance": "api"}
    state.rules[uid] = rule
    state.groups.setdefault((body["folderUID"], body["ruleGroup"]), {"interval": 60})
    return 201, rule


def _rule(state: GrafanaState, method: str, uid: str, body: dict[str, Any]) -> tuple[int, Any]:
    rule = state.rules.get(uid)
    if rule is None:
        raise Refused(404, "alert rule not found")
    if method == "GET":
        return 200, rule
    if method == "PUT":
        _check_rule(state, body, f"PUT /api/v1/provisioning/alert-rules/{uid}")
        rule.update(body, uid=uid)
        return 200, rule
    raise Refused(400, f"{method} alert-rules/{uid} is not supported")


def _rule_group(
    state: GrafanaState, folder_uid: str, group: str, body: dict[str, Any]
) -> tuple[int, Any]:
    where = f"PUT /api/v1/provisioning/folder/{folder_uid}/rule-groups/{group}"
    if (folder_uid, group) not in state.groups:
        raise Refused(404, f"{where}: rule group not found")
    interval = body.get("interval")
    if not isinstance(interval, int) or interval <= 0 or interval % 10:
        raise Refused(400, f"{where}: interval must be a positive multiple of 10 s")
    for rule in body.get("rules", []):
        if rule.get("folderUID") != folder_uid or rule.get("ruleGroup") != group:
            raise Refused(400, f"{where}: rule {rule.get('uid')} belongs to another group")
        if rule.get("uid") not in state.rules:
            raise Refused(400, f"{where}: rule {rule.get('uid')} does not exist")
    state.groups[(folder_uid, group)] = {"interval": interval}
    return 200, {"title": group, "folderUid": folder_uid, "interval": interval,
                 "rules": [state.rules[r["uid"]] for r in body.get("rules", [])]}  # fmt: skip


class FakeGrafana:
    """`with FakeGrafana(token) as grafana:` serves on `grafana.url` until the block ends."""

    def __init__(self, token: str) -> None:
        self.state = GrafanaState(token=token)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeGrafana:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
