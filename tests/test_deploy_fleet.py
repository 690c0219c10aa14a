"""The Redis tier's deployment files agree with the code: deploy/compose.yaml and
deploy/kubernetes/*.yaml. Neither docker nor a cluster is needed: they are read."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from serverless.app import create_app
from serverless.fleet.wire import GROUP, PRIORITIES, stream
from serverless.settings import CLOUD_CREDENTIALS, Settings
from tests.servers import ROOT
from tests.test_deploy_files import names_documented, names_read_by_the_app

DEPLOY = ROOT / "deploy"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def kubernetes() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def our_compose_services() -> dict[str, dict[str, Any]]:
    """The services that run the adapter (not Redis, not the emulators)."""
    return {
        name: service for name, service in compose()["services"].items() if "ROLE" in (service.get("environment") or {})
    }


def our_containers() -> dict[str, dict[str, Any]]:
    found = {}
    for doc in kubernetes():
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                found[doc["metadata"]["name"]] = container
    return found


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def test_every_env_name_in_the_deploy_files_is_a_setting_the_app_reads_and_documents() -> None:
    read, documented = names_read_by_the_app() | set(CLOUD_CREDENTIALS), names_documented()
    names = {name for service in our_compose_services().values() for name in service["environment"]}
    names |= {item["name"] for container in our_containers().values() for item in container["env"]}
    assert names, "no settings found"
    assert names <= read, f"not read by the app: {sorted(names - read)}"
    assert names <= documented, f"not in README's settings table: {sorted(names - documented)}"


def test_the_deploy_files_values_are_settings_the_app_accepts() -> None:
    roles = set()
    for service in our_compose_services().values():
        settings = Settings.from_env({key: str(value) for key, value in service["environment"].items()})
        roles.add(settings.role)
        assert (settings.status_backend, settings.queue_backend) == ("redis", "redis")
    for container in our_containers().values():
        settings = Settings.from_env(literal_env(container))
        roles.add(settings.role)
        assert (settings.status_backend, settings.queue_backend) == ("redis", "redis")
    assert roles == {"gateway", "worker"}


def test_compose_runs_redis_a_gateway_and_two_workers_each_with_its_own_comfyui() -> None:
    services = compose()["services"]
    assert "appendonly" in " ".join(services["redis"]["command"])
    ours = our_compose_services()
    gateways = [s for s in ours.values() if s["environment"]["ROLE"] == "gateway" and "profiles" not in s]
    workers = [s for s in ours.values() if s["environment"]["ROLE"] == "worker" and "profiles" not in s]
    assert len(gateways) == 1 and len(workers) == 2
    comfyuis = {w["environment"]["COMFYUI_URL"] for w in workers}
    assert len(comfyuis) == 2
    for url in comfyuis:
        host = re.match(r"http://([\w-]+):", url)
        assert host and "comfyui_emulator" in " ".join(services[host[1]]["command"])
    assert all("serverless.server" in " ".join(s["command"]) for s in [*gateways, *workers])


def test_kubernetes_probes_and_hooks_are_routes_of_the_app_and_workers_ask_for_a_gpu() -> None:
    paths = {route.path for route in create_app(Settings()).routes}  # type: ignore[attr-defined]
    containers = our_containers()
    assert set(containers) == {"comfyui-gateway", "comfyui-worker"}
    for container in containers.values():
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] in paths
        hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        assert "/pre-stop" in hook and "/pre-stop" in paths and "Bearer" in hook and "LIFECYCLE_TOKEN" in hook
    assert containers["comfyui-worker"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in kubernetes()}
    assert ("Service", "comfyui-gateway") in kinds


@pytest.mark.parametrize("priority", PRIORITIES)
def test_keda_scales_workers_on_every_priority_streams_lag(priority: str) -> None:
    [scaled] = [doc for doc in kubernetes() if doc["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "comfyui-worker"
    triggers = {t["metadata"]["stream"]: t for t in scaled["spec"]["triggers"] if t["type"] == "redis-streams"}
    assert triggers[stream(priority)]["metadata"]["consumerGroup"] == GROUP
