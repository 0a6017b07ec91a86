"""deploy/ checked offline: Kubernetes manifests against the Kubernetes API schemas
(kubernetes-validate), compose.yaml against the Compose Specification's JSON schema, the
systemd units with systemd-analyze, the Slurm scripts with shellcheck, and every gpuledger
command they start against the real command line. Nothing is brought up: no Docker daemon or
cluster runs here (deploy/README.md says so)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from gpuledger.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FIXTURES = Path(__file__).parent / "fixtures"
# Oldest Kubernetes we claim (1.31) and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
IMAGE = "gpuledger:0.1.0"
runner = CliRunner()


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def need_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: install it (apt-get install -y {package}); see Makefile"
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    ("name", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_kubernetes_manifests_match_the_api_schemas(
    name: str, doc: dict[str, Any], version: str
) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelled_manifest_field_is_caught() -> None:
    daemonset = next(doc for name, doc in manifests() if "DaemonSet" in name)
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["hostPid"] = True  # hostPID, misspelled
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_agent_daemonset_sees_the_host_and_takes_no_gpu() -> None:
    daemonset = next(doc for name, doc in manifests() if "DaemonSet" in name)
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["runtimeClassName"] == "nvidia"
    (agent,) = pod["containers"]
    assert "nvidia.com/gpu" not in json.dumps(agent["resources"])
    assert agent["resources"]["limits"] and agent["ports"][0]["name"] == "metrics"
    proc = next(m for m in agent["volumeMounts"] if m["name"] == "host-proc")
    assert proc["readOnly"] is True


def compose_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((FIXTURES / "compose-spec.json").read_text())
    return schema


def test_compose_file_matches_the_compose_specification() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_a_wrong_compose_field_is_caught() -> None:
    broken = compose()
    broken["services"]["kafka"]["healthcheck"]["retry"] = 3  # retries, misspelled
    validator = jsonschema.Draft202012Validator(compose_schema())
    assert list(validator.iter_errors(broken))


def test_compose_pins_images_and_checks_health() -> None:
    services = compose()["services"]
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} needs a health check"
    assert {"kafka", "clickhouse", "grafana", "worker-1", "worker-2", "agent"} <= set(services)
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    grafana = services["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    for volume in grafana["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / source).is_dir(), f"grafana mounts missing {source}"


def test_compose_publishes_ports_on_the_loopback_unless_told_otherwise() -> None:
    published = 0
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            parts = str(port).rsplit(":", 2)
            assert len(parts) == 3, f"{name} publishes {port} on every address"
            address = parts[0]
            chosen = re.fullmatch(r"\$\{\w+:-([^}]*)\}", address)
            default = chosen.group(1) if chosen else address
            assert default == "127.0.0.1", f"{name} publishes {port} beyond the loopback"
            published += 1
    assert published >= 1  # Grafana's


def test_compose_gives_no_password_a_default() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    references = re.findall(r"\$\{(\w*PASSWORD\w*)([^}]*)\}", text)
    assert references
    for name, tail in references:
        assert tail == "" or tail.startswith(":?"), f"${{{name}{tail}}} has a default"
    data = compose()
    grafana = data["services"]["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    secret = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].removeprefix(
        "/run/secrets/"
    )
    assert secret in grafana["secrets"]
    for name, spec in data["secrets"].items():
        source = DEPLOY / spec["file"]
        assert not source.exists(), f"secret {name} is a file in the repository"
        relative = str(source.relative_to(ROOT))
        ignored = subprocess.run(["git", "check-ignore", "-q", relative], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{relative} is not ignored by git"


def test_grafana_reads_clickhouse_as_the_read_only_analyst() -> None:
    sources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "gpuledger.yaml").read_text()
    )["datasources"]
    assert [s["jsonData"]["username"] for s in sources] == ["gpuledger_analyst"]
    grants = (DEPLOY / "clickhouse" / "analyst_reader.sql").read_text()
    assert "GRANT SELECT ON gpuledger.* TO gpuledger_reader;" in grants
    assert "readonly = 2" in grants
    services = compose()["services"]
    clickhouse = services["clickhouse"]
    assert (
        "./clickhouse/create_analyst_user.sh:/docker-entrypoint-initdb.d/50-analyst-user.sh:ro"
        in clickhouse["volumes"]
    )
    analyst_file = clickhouse["environment"]["GPULEDGER_ANALYST_PASSWORD_FILE"]
    assert analyst_file.removeprefix("/run/secrets/") in clickhouse["secrets"]
    grafana = services["grafana"]
    assert analyst_file.removeprefix("/run/secrets/") in grafana["secrets"]
    start = " ".join(grafana["entrypoint"])
    assert analyst_file in start and "exec /run.sh" in start
    # The read-write account's password never reaches Grafana.
    assert "GPULEDGER_CLICKHOUSE_PASSWORD:" not in json.dumps(grafana)
    assert "GPULEDGER_CLICKHOUSE_PASSWORD" not in grafana["environment"]


def gpuledger_commands() -> list[tuple[str, list[str]]]:
    """Every gpuledger command line that deploy/ starts, with where it comes from."""
    found: list[tuple[str, list[str]]] = []
    for name, service in compose()["services"].items():
        if service["image"] == IMAGE:
            found.append((f"compose {name}", list(service["command"])))
    for name, doc in manifests():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            if container["image"] == IMAGE:
                found.append((f"k8s {name}/{container['name']}", list(container["args"])))
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = line.removeprefix("ExecStart=").split()
                assert argv[0].endswith("/gpuledger"), f"{unit.name}: {argv[0]}"
                found.append((f"systemd {unit.name}", argv[1:]))
    return found


@pytest.mark.parametrize(
    ("where", "argv"), gpuledger_commands(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_deployed_command_exists_in_the_cli(where: str, argv: list[str]) -> None:
    result = runner.invoke(app, [*argv, "--help"])
    assert result.exit_code == 0, f"{where}: gpuledger {' '.join(argv)}: {result.output}"
    for arg in argv:
        if arg.startswith("/app/"):
            assert (ROOT / arg.removeprefix("/app/")).exists(), f"{where}: {arg} is not shipped"


def test_systemd_units_verify(tmp_path: Path) -> None:
    tool = need_tool("systemd-analyze", "systemd")
    env = tmp_path / "gpuledger.env"
    env.write_text((DEPLOY / "gpuledger.env.example").read_text())
    gpuledger = shutil.which("gpuledger") or str(
        Path(__import__("sys").executable).parent / "gpuledger"
    )
    units = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/gpuledger/bin/gpuledger", gpuledger)
        text = text.replace("/etc/gpuledger/gpuledger.env", str(env))
        name = unit.name.replace("@.service", "@1.service")
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    done = subprocess.run([tool, "verify", *units], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_settings_example_names_only_known_settings() -> None:
    from gpuledger.settings import Settings

    known = {f"GPULEDGER_{name.upper()}" for name in Settings.model_fields}
    for line in (DEPLOY / "gpuledger.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.split("=", 1)[0] in known, line


def test_slurm_scripts_pass_shellcheck() -> None:
    tool = need_tool("shellcheck", "shellcheck")
    scripts = sorted(str(p) for p in (DEPLOY / "slurm").glob("*.sh"))
    assert len(scripts) == 3  # the Prolog, the Epilog and what they share
    done = subprocess.run(
        [tool, "--shell=sh", "--severity=style", *scripts],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_cluster_override_names_one_cluster_everywhere_and_shards_on_both_servers() -> None:
    override: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = list(validator.iter_errors(override))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    services = {**compose()["services"], **override["services"]}
    config = ElementTree.parse(DEPLOY / "clickhouse" / "cluster" / "cluster.xml").getroot()
    servers = config.find("remote_servers")
    assert servers is not None
    (cluster,) = list(servers)
    hosts = [r.findtext("host") for r in cluster.iter("replica")]
    assert hosts == ["clickhouse", "clickhouse-2"] and set(hosts) <= set(services)
    assert config.findtext("zookeeper/node/host") in services
    assert override["services"]["migrate"]["command"][-2:] == ["--cluster", cluster.tag]
    for worker in ("worker-1", "worker-2"):
        assert override["services"][worker]["environment"]["GPULEDGER_STORE_CLUSTER"] == cluster.tag
    macros = [
        ElementTree.parse(DEPLOY / "clickhouse" / "cluster" / f"shard-{n}.xml").getroot()
        for n in (1, 2)
    ]
    assert len({m.findtext("macros/shard") for m in macros}) == 2
    assert [m.findtext("macros/replica") for m in macros] == hosts
