"""`gpuledger grafana export` and `gpuledger grafana sync`, run as a user runs them. Sync
talks to a local stand-in that checks each request against Grafana's documented HTTP API
(tests/grafana/fake_grafana.py); no Grafana server runs here."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from gpuledger.cli import app
from gpuledger.grafana import alert_rules, cost_explorer, fleet_live
from gpuledger.grafana.provisioning import (
    DEFAULT_CLICKHOUSE_URL,
    ClickHouseEndpoint,
    boards,
    export,
)
from tests.grafana.fake_grafana import FakeGrafana

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "glsa_test_token"
STORE = "clickhouse://grafana:s3cret@clickhouse:8123/gpuledger"
runner = CliRunner()


def sync(url: str, token: str = TOKEN, *extra: str) -> tuple[int, str]:
    result = runner.invoke(
        app,
        ["grafana", "sync", "--url", url, "--token", token, *extra],
        env={"GPULEDGER_STORE": STORE},
    )
    return result.exit_code, result.output


def test_export_writes_dashboards_rules_and_provisioning(tmp_path: Path) -> None:
    result = runner.invoke(app, ["grafana", "export", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "wrote 2 dashboards" in result.output
    out = tmp_path / "out"
    for uid in (fleet_live.UID, cost_explorer.UID):
        dashboard = json.loads((out / "dashboards" / f"{uid}.json").read_text())
        assert dashboard["uid"] == uid and dashboard["panels"]
    source = yaml.safe_load((out / "provisioning/datasources/gpuledger.yaml").read_text())
    (ds,) = source["datasources"]
    assert ds["type"] == "grafana-clickhouse-datasource"
    assert ds["jsonData"]["host"] == "clickhouse" and ds["jsonData"]["port"] == 8123
    assert ds["secureJsonData"] == {"password": "$GPULEDGER_CLICKHOUSE_PASSWORD"}
    provider = yaml.safe_load((out / "provisioning/dashboards/gpuledger.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards/gpuledger"
    rules = yaml.safe_load((out / "provisioning/alerting/gpuledger.yaml").read_text())
    (group,) = rules["groups"]
    assert [r["uid"] for r in group["rules"]] == [r.uid for r in alert_rules.rule_queries()]
    # Grafana expands $NAME in provisioning files: every literal $ is written as $$.
    burn = group["rules"][2]["data"][0]["model"]["rawSql"]
    assert "$$__timeFilter(m.ts)" in burn and "$__" not in burn.replace("$$__", "")


def test_export_refuses_a_chdb_store_for_grafana(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["grafana", "export", str(tmp_path), "--clickhouse-url", "chdb:///var/ledger"]
    )
    assert result.exit_code == 2
    assert "clickhouse://" in result.output


def test_committed_deploy_files_match_the_code(tmp_path: Path) -> None:
    """deploy/grafana/ is `gpuledger grafana export deploy/grafana`: regenerate it after
    changing a board."""
    export(tmp_path, endpoint=ClickHouseEndpoint.from_url(DEFAULT_CLICKHOUSE_URL))
    committed = ROOT / "deploy" / "grafana"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    for relative in fresh:
        assert (committed / relative).read_text() == (tmp_path / relative).read_text(), (
            f"deploy/grafana/{relative} is stale: run `gpuledger grafana export deploy/grafana`"
        )


def test_sync_creates_everything_then_updates_without_duplicates() -> None:
    with FakeGrafana(TOKEN) as grafana:
        code, output = sync(grafana.url)
        assert code == 0, output
        assert "7 created, 0 updated" in output  # folder, data source, 2 dashboards, 3 rules
        state = grafana.state
        assert state.violations == []
        assert set(state.folders) == {"gpuledger"}
        (source,) = state.datasources.values()
        assert source["jsonData"]["host"] == "clickhouse"
        assert source["jsonData"]["username"] == "grafana"
        assert source["secureJsonData"] == {"password": "s3cret"}
        assert set(state.dashboards) == {fleet_live.UID, cost_explorer.UID}
        assert len(state.rules) == 3
        first_ids = {uid: d["dashboard"]["id"] for uid, d in state.dashboards.items()}

        code, output = sync(grafana.url)
        assert code == 0, output
        assert "0 created, 6 updated" in output  # the folder's title did not change
        assert state.violations == []
        assert len(state.folders) == 1 and len(state.datasources) == 1
        assert len(state.dashboards) == 2 and len(state.rules) == 3
        assert {uid: d["dashboard"]["id"] for uid, d in state.dashboards.items()} == first_ids
        assert all(d["version"] == 2 for d in state.dashboards.values())
        assert state.groups[("gpuledger", "gpuledger")] == {"interval": 60}
        stored = state.dashboards[fleet_live.UID]["dashboard"]
        built = next(b for b in boards() if b.uid == fleet_live.UID)
        sql = [t["rawSql"] for p in stored["panels"] for t in p["targets"]]
        assert sql == [p.sql for p in built.panels]
        creates = [r for r in state.requests if r[0] == "POST" and "alert-rules" in r[1]]
        assert len(creates) == 3  # only the first sync created rules


def test_sync_with_a_wrong_token_says_what_to_do() -> None:
    with FakeGrafana(TOKEN) as grafana:
        code, output = sync(grafana.url, "wrong")
        assert code == 1
        assert "401" in output and "--token" in output
        assert grafana.state.folders == {}


def test_sync_needs_a_clickhouse_address_grafana_can_reach() -> None:
    result = runner.invoke(
        app,
        ["grafana", "sync", "--url", "http://127.0.0.1:9", "--token", TOKEN],
        env={"GPULEDGER_STORE": "chdb:///tmp/ledger"},
    )
    assert result.exit_code == 2
    assert "--clickhouse-url" in result.output


def test_sync_reports_an_unreachable_grafana() -> None:
    with FakeGrafana(TOKEN) as grafana:
        url = grafana.url
    code, output = sync(url)
    assert code == 1
    assert "not reachable" in output or "health check failed" in output
