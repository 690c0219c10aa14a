"""The Redis tier's deployment files agree with the code and with what their platforms accept:
deploy/compose.yaml, deploy/gateway.Dockerfile, deploy/kubernetes/*.yaml (with the example Secrets
in deploy/kubernetes/example/) and deploy/redis/trim-queue.lua.

Neither a docker engine nor a cluster is needed. The Kubernetes objects are validated against the
API's own schemas (the `kubernetes-validate` package ships them; skipped without it), KEDA's
objects against the shape KEDA's CRDs and its redis-streams scaler accept, and the compose file
with `docker compose config` when a docker CLI with compose is installed (skipped otherwise)."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from serverless.app import create_app
from serverless.fleet.wire import GROUP, PRIORITIES, stream
from serverless.settings import CLOUD_CREDENTIALS, Settings
from tests.servers import ROOT
from tests.test_deploy_files import dockerfile_env, dockerignore_patterns, names_documented, names_read_by_the_app

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSIONS = ("1.29.0", "latest")  # the oldest still common in managed clusters; the newest the package knows
HEALTH, READY = "/api/serverless/health", "/api/serverless/ready"


# -- reading the files --------------------------------------------------------------------------


def interpolated(value: Any) -> Any:
    """`value` with compose's `${NAME:-default}` / `${NAME}` read as in an empty environment."""
    if isinstance(value, dict):
        return {key: interpolated(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolated(item) for item in value]
    if isinstance(value, str):
        return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m[1] or "", value).replace("$$", "$")
    return value


def compose() -> dict[str, Any]:
    return dict(interpolated(yaml.safe_load((DEPLOY / "compose.yaml").read_text())))


def our_compose_services() -> dict[str, dict[str, Any]]:
    """The services that run the adapter (not Redis, not the emulators)."""
    return {
        name: service for name, service in compose()["services"].items() if "ROLE" in (service.get("environment") or {})
    }


def kubernetes() -> list[dict[str, Any]]:
    """Every object of deploy/kubernetes/*.yaml (what `kubectl apply -f deploy/kubernetes/` applies)."""
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def example_secrets() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERNETES / "example" / "secrets.yaml").read_text()) if doc]


def objects(kind: str, documents: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents or kubernetes() if doc["kind"] == kind}


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod template, by its workload's name."""
    found = {}
    for doc in kubernetes():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            found[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            found[doc["metadata"]["name"]] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return found


def our_containers() -> dict[str, dict[str, Any]]:
    """The container running the adapter in each Deployment (the one with a ROLE)."""
    found = {}
    for name, doc in objects("Deployment").items():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if any(item["name"] == "ROLE" for item in container.get("env", [])):
                found[name] = container
    return found


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: its config maps, then its own entries, Secrets' values
    taken from the example Secrets (fieldRefs get a placeholder)."""
    config_maps = objects("ConfigMap")
    secrets = {name: doc.get("stringData", {}) for name, doc in objects("Secret", example_secrets()).items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[item["name"]] = "pod-name-0"
    return env


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def app_paths() -> set[str]:
    return {route.path for route in create_app(Settings()).routes}  # type: ignore[attr-defined]


def gateway_dockerfile() -> str:
    return (DEPLOY / "gateway.Dockerfile").read_text()


# -- settings -----------------------------------------------------------------------------------


def test_every_env_name_in_the_deploy_files_is_a_setting_the_app_reads_and_documents() -> None:
    read, documented = names_read_by_the_app() | set(CLOUD_CREDENTIALS), names_documented()
    names = {name for service in our_compose_services().values() for name in service["environment"]}
    names |= {name for container in our_containers().values() for name in container_env(container)}
    names |= set(objects("Secret", example_secrets())["comfyui-secrets"]["stringData"])
    names |= set(objects("ConfigMap")["comfyui-config"]["data"])
    assert {"REDIS_URL", "LIFECYCLE_TOKEN", "API_KEYS", "FILE_LINK_SECRET", "MAX_QUEUED_JOBS"} <= names
    assert names <= read, f"not read by the app: {sorted(names - read)}"
    assert names <= documented, f"not in README's settings table: {sorted(names - documented)}"


def test_the_deploy_files_values_are_settings_the_app_accepts() -> None:
    roles = set()
    for service in our_compose_services().values():
        settings = Settings.from_env({key: str(value) for key, value in service["environment"].items()})
        roles.add(settings.fleet.role)
        assert (settings.status.backend, settings.fleet.queue_backend) == ("redis", "redis")
    for container in our_containers().values():
        settings = Settings.from_env(container_env(container))
        roles.add(settings.fleet.role)
        assert (settings.status.backend, settings.fleet.queue_backend) == ("redis", "redis")
        assert (
            settings.security.api_keys and settings.security.lifecycle_token
        )  # the example Secret's values are accepted
        assert settings.deprecated == (), "a deploy file sets an old name"
    assert roles == {"gateway", "worker"}


# -- compose ------------------------------------------------------------------------------------


def test_compose_runs_redis_a_gateway_and_two_workers_each_with_its_own_comfyui() -> None:
    services = compose()["services"]
    ours = our_compose_services()
    gateways = [s for s in ours.values() if s["environment"]["ROLE"] == "gateway" and "profiles" not in s]
    workers = [s for s in ours.values() if s["environment"]["ROLE"] == "worker" and "profiles" not in s]
    assert len(gateways) == 1 and len(workers) == 2
    comfyuis = {w["environment"]["COMFYUI_URL"] for w in workers}
    assert len(comfyuis) == 2
    for url in comfyuis:
        host = re.match(r"http://([\w-]+):", url)
        assert host and "comfyui_emulator" in " ".join(services[host[1]]["entrypoint"])
        assert services[host[1]]["volumes"] == ["../comfyui_emulator:/emulator/comfyui_emulator:ro"]


def test_compose_builds_its_images_once_and_installs_nothing_at_start() -> None:
    for name, service in compose()["services"].items():
        started = " ".join(map(str, service.get("command", []) + service.get("entrypoint", [])))
        assert "pip " not in started and "install" not in started, f"{name} installs at start"
        assert service["image"], name
        if "build" in service:
            dockerfile = service["build"]["dockerfile"]
            assert service["build"]["context"] == ".." and (ROOT / dockerfile).exists()
            expected = "Dockerfile" if "gpu" in service.get("profiles", []) else "deploy/gateway.Dockerfile"
            assert dockerfile == expected, name
    assert all("build" in service for service in our_compose_services().values())


def test_compose_services_restart_and_report_their_health() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
    for name in ("redis", "gateway", "worker-1", "worker-2", "worker-gpu", "comfyui-1", "comfyui-2"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name, service in our_compose_services().items():
        assert HEALTH in " ".join(service["healthcheck"]["test"]), name
        assert HEALTH in app_paths()
        waits = service["depends_on"]
        assert all(dependency["condition"] == "service_healthy" for dependency in waits.values()), name
        assert "redis" in waits


def test_compose_publishes_the_api_on_loopback_unless_told_otherwise() -> None:
    [published] = compose()["services"]["gateway"]["ports"]
    assert published == "127.0.0.1:9000:9000"
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert raw["x-tier-env"]["API_KEYS"] == "${API_KEYS:-}"  # set with GATEWAY_ADDRESS to open it
    assert all("ports" not in service for name, service in compose()["services"].items() if name != "gateway")


def test_compose_redis_is_durable_and_refuses_writes_rather_than_evict() -> None:
    arguments = redis_arguments(compose()["services"]["redis"]["command"][1:])
    assert arguments["appendonly"] == "yes" and arguments["appendfsync"] == "always"
    assert arguments["maxmemory-policy"] == "noeviction" and arguments["maxmemory"]


def test_compose_gives_a_draining_instance_its_drain_timeout_before_killing_it() -> None:
    for name, service in our_compose_services().items():
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > float(service["environment"]["DRAIN_TIMEOUT"]), name


# Where the docker CLI looks for its plugins (docker-compose among them), for the user and for all.
DOCKER_PLUGIN_DIRS = [
    Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "cli-plugins",
    *(Path(prefix) / "docker" / "cli-plugins" for prefix in ("/usr/local/lib", "/usr/local/libexec", "/usr/lib")),
    Path("/usr/libexec/docker/cli-plugins"),
]


@functools.cache
def docker_compose() -> list[str] | None:
    """`docker compose` (the plugin) or `docker-compose` (the standalone program), if installed
    (the plugin found where docker finds it, without starting docker to ask)."""
    if shutil.which("docker") and any((folder / "docker-compose").is_file() for folder in DOCKER_PLUGIN_DIRS):
        return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


@pytest.mark.parametrize("profile", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_docker_compose_config_accepts_the_file(profile: list[str], tmp_path: Path) -> None:
    command = docker_compose()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run(
        [*command, "-f", str(DEPLOY / "compose.yaml"), *profile, "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)},  # no API_KEYS etc. of ours
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert {"redis", "gateway", "worker-1", "worker-2"} <= set(resolved)
    assert "worker-gpu" in resolved or not profile  # (docker-compose 1.x lists every profile)
    [published] = resolved["gateway"]["ports"]  # "127.0.0.1:9000:9000/tcp", or a mapping (compose 2)
    assert "127.0.0.1" in str(published) and "9000" in str(published)


# -- images -------------------------------------------------------------------------------------


def test_the_gateway_image_is_the_adapter_alone_without_comfyui_or_torch() -> None:
    text = gateway_dockerfile()
    instructions = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert not re.search(r"torch|ComfyUI|nvidia|cuda|apt-get", instructions, re.IGNORECASE)
    copied = [
        source
        for line in text.splitlines()
        if line.startswith("COPY ")
        for source in [part for part in line.split()[1:-1] if not part.startswith("--")]
    ]
    assert set(copied) == {"requirements.txt", "bootstrap", "handler.py", "serverless"}
    for source in copied:  # the build context (the checkout, filtered by .dockerignore) has them
        assert (ROOT / source).exists() and source not in dockerignore_patterns()
    assert re.search(r"^RUN .*pip install -r /app/requirements\.txt$", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["/app/bootstrap"\]$', text, re.MULTILINE)
    assert re.search(r"^USER 10001$", text, re.MULTILINE)


def test_the_gateway_image_defaults_to_a_gateway_listening_on_every_address() -> None:
    text = gateway_dockerfile().replace("\\\n", " ")
    env = {
        name: value
        for line in text.splitlines()
        if line.startswith("ENV ")
        for name, _, value in [token.partition("=") for token in shlex.split(line[4:])]
    }
    settings = Settings.from_env(env)
    assert (settings.fleet.role, settings.fleet.queue_backend, settings.status.backend) == ("gateway", "redis", "redis")
    assert settings.service.host == "0.0.0.0" and settings.status.workflows_dir == Path("/mnt/auto/workflows")


def test_kubernetes_gateways_run_the_slim_image_and_workers_the_gpu_image() -> None:
    containers = our_containers()
    assert "comfyui-serverless-gateway" in containers["comfyui-gateway"]["image"]
    assert containers["comfyui-worker"]["image"].rsplit("/", 1)[1].startswith("comfyui-serverless-api:")
    assert containers["comfyui-worker"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in containers["comfyui-gateway"]["resources"].get("limits", {})


# -- Kubernetes: what the API accepts -----------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_validate_against_the_api_schemas(version: str) -> None:
    validator = pytest.importorskip("kubernetes_validate")
    version = validator.utils.latest_version() if version == "latest" else version
    documents = [*kubernetes(), *example_secrets()]
    checked = 0
    for doc in documents:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: see the KEDA tests below
        validator.validate(doc, version, strict=True)  # raises ValidationError naming the field
        checked += 1
    kinds = {doc["kind"] for doc in documents}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds
    assert {"PersistentVolumeClaim", "CronJob"} <= kinds and checked == len(documents) - 2


def test_the_schema_validation_catches_a_misplaced_field() -> None:
    validator = pytest.importorskip("kubernetes_validate")
    gateway = objects("Deployment")["comfyui-gateway"]
    broken = yaml.safe_load(yaml.safe_dump(gateway))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["path"] = READY
    with pytest.raises(validator.ValidationError):
        validator.validate(broken, validator.utils.latest_version(), strict=True)


def test_every_workload_selects_its_own_pods_and_every_service_and_budget_selects_pods() -> None:
    workloads = {**objects("Deployment"), **objects("StatefulSet")}
    pod_labels = [doc["spec"]["template"]["metadata"]["labels"] for doc in workloads.values()]
    for name, doc in workloads.items():
        selector = doc["spec"]["selector"]["matchLabels"]
        assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items(), name
    for name, service in objects("Service").items():
        assert any(service["spec"]["selector"].items() <= labels.items() for labels in pod_labels), name
        for port in service["spec"]["ports"]:
            named = [p["name"] for d in workloads.values() for c in d["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])]  # fmt: skip
            assert port["targetPort"] in named, name
    for name, budget in objects("PodDisruptionBudget").items():
        assert any(budget["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in pod_labels), name
    for name, statefulset in objects("StatefulSet").items():
        assert statefulset["spec"]["serviceName"] in objects("Service"), name


def test_every_secret_config_map_and_claim_referenced_is_defined_with_its_keys() -> None:
    config_maps = {name: set(doc["data"]) for name, doc in objects("ConfigMap").items()}
    secrets = {name: set(doc["stringData"]) for name, doc in objects("Secret", example_secrets()).items()}
    claims = set(objects("PersistentVolumeClaim"))
    for workload, spec in pod_specs().items():
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, workload
            for item in container.get("env", []):
                for kind, defined in (("secretKeyRef", secrets), ("configMapKeyRef", config_maps)):
                    ref = item.get("valueFrom", {}).get(kind)
                    if ref:
                        assert ref["key"] in defined.get(ref["name"], set()), f"{workload}: {ref}"
            mounted = {mount["name"] for mount in container.get("volumeMounts", [])}
            assert mounted <= {volume["name"] for volume in spec.get("volumes", [])} | template_claims(workload)
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, workload
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, workload
    authentication = objects("TriggerAuthentication")["comfyui-redis"]
    for ref in authentication["spec"]["secretTargetRef"]:
        assert ref["key"] in secrets[ref["name"]]


def template_claims(workload: str) -> set[str]:
    statefulset = objects("StatefulSet").get(workload)
    return {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]} if statefulset else set()


def test_the_example_secrets_agree_with_each_other_and_are_placeholders() -> None:
    secrets = {name: doc["stringData"] for name, doc in objects("Secret", example_secrets()).items()}
    password, url = secrets["comfyui-redis"]["password"], secrets["comfyui-secrets"]["REDIS_URL"]
    assert f":{password}@comfyui-redis:6379/" in url
    assert ".svc.cluster.local:6379" in secrets["comfyui-redis"]["address"]  # KEDA runs in its own namespace
    for values in secrets.values():
        for key, value in values.items():
            assert "CHANGE-ME" in value or key == "address", key
    assert not list(KUBERNETES.glob("*secret*")), "real secrets do not belong in the applied folder"


# -- Kubernetes: probes, hooks, rollouts --------------------------------------------------------


def test_readiness_is_ready_and_liveness_does_not_depend_on_redis() -> None:
    paths = app_paths()
    for name, container in our_containers().items():
        ready = container["readinessProbe"]["httpGet"]
        assert ready["path"] == READY and READY in paths, name
        assert container["livenessProbe"] == {**container["livenessProbe"], "tcpSocket": {"port": "http"}}, name
        assert "httpGet" not in container["livenessProbe"] and "exec" not in container["livenessProbe"]
        assert "http" in {port["name"] for port in container["ports"]}
    startup = our_containers()["comfyui-worker"]["startupProbe"]
    assert "tcpSocket" in startup and startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_hooks_drain_before_the_grace_period_ends() -> None:
    paths = app_paths()
    for name, container in our_containers().items():
        hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        assert "/pre-stop" in hook and "/pre-stop" in paths and "Bearer" in hook and "LIFECYCLE_TOKEN" in hook
        drain = float(literal_env(container)["DRAIN_TIMEOUT"])
        hook_timeout = float(re.findall(r"timeout=(\d+)", hook)[-1])
        grace = objects("Deployment")[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert drain < hook_timeout < grace, name
    worker = literal_env(our_containers()["comfyui-worker"])
    assert float(worker["JOB_TIMEOUT"]) <= float(worker["DRAIN_TIMEOUT"])  # a running job may finish


def test_workers_roll_one_at_a_time_without_a_surge_gpu_and_gateways_surge() -> None:
    deployments = objects("Deployment")
    worker = deployments["comfyui-worker"]["spec"]["strategy"]
    assert worker == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    gateway = deployments["comfyui-gateway"]["spec"]["strategy"]["rollingUpdate"]
    assert gateway == {"maxSurge": 1, "maxUnavailable": 0}


def test_disruption_budgets_keep_a_gateway_and_take_one_worker_at_a_time() -> None:
    budgets = {
        doc["spec"]["selector"]["matchLabels"]["app"]: doc["spec"] for doc in objects("PodDisruptionBudget").values()
    }
    assert budgets["comfyui-gateway"]["minAvailable"] == 1
    assert budgets["comfyui-worker"]["maxUnavailable"] == 1  # minAvailable would block drains at 0-1 replicas
    assert objects("Deployment")["comfyui-gateway"]["spec"]["replicas"] > budgets["comfyui-gateway"]["minAvailable"]


def test_worker_outputs_and_inputs_live_on_a_bounded_volume_that_a_sidecar_prunes() -> None:
    spec = objects("Deployment")["comfyui-worker"]["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    worker = our_containers()["comfyui-worker"]
    mounts = {mount["mountPath"]: mount for mount in worker["volumeMounts"]}
    command = shlex.split(dockerfile_env()["COMFYUI_CMD"])
    for folder in ("--output-directory", "--input-directory"):  # where the image's ComfyUI writes
        mount = mounts[command[command.index(folder) + 1]]
        assert volumes[mount["name"]]["emptyDir"]["sizeLimit"], folder
    assert mounts["/mnt/auto/models"]["readOnly"] is True
    [pruner] = [c for c in spec["containers"] if c["name"] != worker["name"]]
    assert {m["name"] for m in pruner["volumeMounts"]} == {mounts["/mnt/auto/output"]["name"]}
    script = pruner["command"][-1]
    assert "trap 'exit 0' TERM" in script and "-delete" in script  # it exits at once on SIGTERM
    assert pruner["resources"]["limits"]["memory"]


def test_gateways_share_the_hosted_workflows_folder() -> None:
    spec = objects("Deployment")["comfyui-gateway"]["spec"]["template"]["spec"]
    gateway = our_containers()["comfyui-gateway"]
    [mount] = [m for m in gateway["volumeMounts"] if m["mountPath"] == literal_env(gateway)["WORKFLOWS_DIR"]]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    claim = objects("PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert spec["securityContext"]["fsGroup"] == 10001  # the image's user may write there


# -- Redis --------------------------------------------------------------------------------------


def redis_arguments(args: list[str]) -> dict[str, str]:
    pairs = {}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        assert flag.startswith("--"), flag
        pairs[flag[2:]] = value
    return pairs


def memory_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    scale = {"": 1, "Mi": 2**20, "Gi": 2**30, "mb": 2**20, "gb": 2**30}
    return int(number) * scale[unit]


def test_kubernetes_redis_is_durable_bounded_and_probed() -> None:
    [redis_pod] = [objects("StatefulSet")["comfyui-redis"]["spec"]["template"]["spec"]]
    [container] = redis_pod["containers"]
    arguments = redis_arguments(container["args"])
    assert arguments["appendonly"] == "yes" and arguments["appendfsync"] == "always"
    assert arguments["maxmemory-policy"] == "noeviction" and arguments["requirepass"] == "$(REDIS_PASSWORD)"
    limit = memory_bytes(container["resources"]["limits"]["memory"])
    assert memory_bytes(arguments["maxmemory"]) * 1.5 <= limit  # room for the AOF rewrite's fork
    assert "redis-cli ping" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert container["livenessProbe"]["tcpSocket"] == {"port": "redis"}  # a long AOF replay is not death
    assert {"REDIS_PASSWORD", "REDISCLI_AUTH"} <= {item["name"] for item in container["env"]}


def trim_script() -> str:
    return (DEPLOY / "redis" / "trim-queue.lua").read_text()


def test_the_queue_trim_job_runs_the_script_on_every_priority_stream() -> None:
    assert objects("ConfigMap")["comfyui-redis-scripts"]["data"]["trim-queue.lua"] == trim_script()
    [container] = pod_specs()["comfyui-queue-trim"]["containers"]
    command = container["command"]
    assert command[command.index(",") + 1 :] == [GROUP]
    assert command[command.index("/scripts/trim-queue.lua") + 1 : command.index(",")] == [stream(p) for p in PRIORITIES]
    assert objects("CronJob")["comfyui-queue-trim"]["spec"]["concurrencyPolicy"] == "Forbid"
    loop = " ".join(compose()["services"]["queue-trim"]["entrypoint"])
    assert f"--eval /scripts/trim-queue.lua {' '.join(stream(p) for p in PRIORITIES)} , {GROUP}" in loop


@pytest.fixture
def scratch_redis(request: pytest.FixtureRequest) -> Any:
    """Database 0 of the suite's redis-server (no other test uses it), emptied first."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    client = redis.Redis.from_url(request.getfixturevalue("redis_server").url(0))
    client.flushdb()
    yield client
    client.flushdb()


def test_the_trim_removes_acknowledged_entries_only_and_keeps_the_lag_exact(scratch_redis: redis.Redis) -> None:
    client, name = scratch_redis, stream("normal")
    client.xgroup_create(name, GROUP, id="0", mkstream=True)
    ids = [client.xadd(name, {"spec": b"x" * 1000}) for _ in range(6)]
    client.xreadgroup(GROUP, "worker-1", {name: ">"}, count=4)  # 4 taken, 2 waiting
    client.xack(name, GROUP, ids[0], ids[1], ids[3])  # ids[2] still runs
    script = client.register_script(trim_script())
    assert script(keys=[stream(p) for p in PRIORITIES], args=[GROUP]) == 2
    assert [entry for entry, _ in client.xrange(name)] == ids[2:]  # the running one and the waiting ones
    [group] = client.xinfo_groups(name)
    assert (group["lag"], group["pending"]) == (2, 1)
    client.xack(name, GROUP, ids[2])
    assert script(keys=[name], args=[GROUP]) == 1  # the last one handed out stays
    assert [entry for entry, _ in client.xrange(name)] == ids[3:]
    taken = client.xreadgroup(GROUP, "worker-1", {name: ">"}, count=10)
    assert [entry for entry, _ in taken[0][1]] == ids[4:]  # nothing waiting was lost


def test_the_trim_frees_memory_when_redis_refuses_writes(scratch_redis: redis.Redis) -> None:
    client, name = scratch_redis, stream("low")
    client.xgroup_create(name, GROUP, id="0", mkstream=True)
    ids = [client.xadd(name, {"spec": b"x" * 20_000}) for _ in range(100)]
    client.xreadgroup(GROUP, "worker-1", {name: ">"}, count=100)
    client.xack(name, GROUP, *ids)
    policy = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(client.info("memory")["used_memory"] - 100_000))
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            client.xadd(name, {"spec": b"y"})
        assert client.register_script(trim_script())(keys=[name], args=[GROUP]) == 99
    finally:  # the server is the suite's: back to no limit
        client.config_set("maxmemory", "0")
        client.config_set("maxmemory-policy", policy)


# -- KEDA ---------------------------------------------------------------------------------------

# What KEDA's redis-streams scaler reads (pkg/scalers/redis_streams_scaler.go): with a consumerGroup,
# lagCount set selects the lag mode (XINFO GROUPS), else pendingEntriesCount (XPENDING).
REDIS_STREAMS_METADATA = {"stream", "consumerGroup", "lagCount", "pendingEntriesCount", "activationLagCount"}


def scaled_object() -> dict[str, Any]:
    [scaled] = objects("ScaledObject").values()
    return scaled


def triggers() -> dict[str, dict[str, Any]]:
    return {trigger["name"]: trigger for trigger in scaled_object()["spec"]["triggers"]}


def test_keda_objects_have_the_shape_keda_accepts() -> None:
    scaled = scaled_object()
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
        "advanced", "triggers", "fallback", "idleReplicaCount", "initialCooldownPeriod",
    }  # fmt: skip
    assert spec["scaleTargetRef"]["name"] in objects("Deployment")
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert len(triggers()) == len(spec["triggers"])  # names are unique
    authentications = objects("TriggerAuthentication")
    for name, trigger in triggers().items():
        assert trigger["type"] == "redis-streams" and set(trigger) <= {"type", "name", "metadata", "authenticationRef"}
        assert set(trigger["metadata"]) <= REDIS_STREAMS_METADATA, name
        assert all(isinstance(value, str) for value in trigger["metadata"].values()), "metadata values are strings"
        assert ("lagCount" in trigger["metadata"]) != ("pendingEntriesCount" in trigger["metadata"]), name
        assert trigger["authenticationRef"]["name"] in authentications
    for ref in authentications["comfyui-redis"]["spec"]["secretTargetRef"]:
        assert set(ref) == {"parameter", "name", "key"} and ref["parameter"] in ("address", "password")


def test_keda_adds_waiting_and_running_jobs_in_one_formula() -> None:
    modifiers = scaled_object()["spec"]["advanced"]["scalingModifiers"]
    assert float(modifiers["target"]) > 0 and modifiers["metricType"] in ("AverageValue", "Value")
    referenced = set(re.findall(r"[A-Za-z_]\w*", modifiers["formula"])) - {"max"}
    assert referenced == set(triggers()), "the formula names exactly the triggers"
    assert "+" in modifiers["formula"] and "max(" in modifiers["formula"]  # a sum; an unknown lag (-1) adds 0


@pytest.mark.parametrize("priority", PRIORITIES)
def test_keda_counts_every_priority_streams_waiting_and_running_jobs(priority: str) -> None:
    on_stream = [t["metadata"] for t in triggers().values() if t["metadata"]["stream"] == stream(priority)]
    assert all(metadata["consumerGroup"] == GROUP for metadata in on_stream)
    assert sorted("lagCount" in metadata for metadata in on_stream) == [False, True]
    assert {metadata.get("lagCount", metadata.get("pendingEntriesCount")) for metadata in on_stream} == {"1"}


# -- README --------------------------------------------------------------------------------------


def test_readme_tells_how_to_operate_the_fleet() -> None:
    section = (ROOT / "README.md").read_text().split("## Operating the fleet", 1)[1].split("\n## ", 1)[0]
    for topic in ("**Sizing Redis.**", "**Probes: what each one means.**", "**Upgrades.**", "**Failures.**"):
        assert topic in section
    faults = [
        line.split("|")[1].strip()
        for line in section.split("**Failures.**", 1)[1].splitlines()
        if line.startswith("| ")
    ]
    for fault in (
        "a worker is killed",
        "ComfyUI crashes",
        "with AOF",
        "without AOF",
        "Redis is full",
        "a gateway is killed",
        "network partition",
    ):
        assert any(fault in row for row in faults), fault
    for name in [
        *objects("Deployment"),
        *objects("StatefulSet"),
        *objects("CronJob"),
        *objects("PersistentVolumeClaim"),
    ]:
        assert f"`{name}`" in section, f"{name} is not documented"
    for secret in objects("Secret", example_secrets()):
        assert f"Secret `{secret}`" in section, secret


def test_the_deployed_queue_trim_is_the_script_the_workers_run() -> None:
    """`deploy/redis/trim-queue.lua` (the CronJob's backstop) and the workers' own trim are one script."""
    from serverless.fleet.queue import TRIM

    def code(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("--")]

    assert code((ROOT / "deploy" / "redis" / "trim-queue.lua").read_text()) == code(TRIM)
