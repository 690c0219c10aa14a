"""The deployment files agree with the code: `s.yaml` (Serverless Devs, fc3), `Dockerfile`,
`.dockerignore` and `bootstrap`. Neither FC nor a docker engine is needed: they are read."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from typing import Any

import pytest
import yaml

from serverless.app import create_app
from serverless.settings import Settings
from tests.servers import ROOT

MOUNT = "/mnt/auto"


def with_vars(value: Any, variables: dict[str, Any]) -> Any:
    """`value` with Serverless Devs' `${vars.name}` references replaced, as `s deploy` does."""
    if isinstance(value, dict):
        return {key: with_vars(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [with_vars(item, variables) for item in value]
    if isinstance(value, str):
        return re.sub(r"\$\{vars\.(\w+)\}", lambda m: str(variables[m[1]]), value)
    return value


@pytest.fixture(scope="module")
def props() -> dict[str, Any]:
    """The function's properties: the one fc3 resource of s.yaml, its `${vars.x}` filled in."""
    document = yaml.safe_load((ROOT / "s.yaml").read_text())
    assert document["edition"] == "3.0.0"
    [resource] = document["resources"].values()
    assert resource["component"] == "fc3"
    return dict(with_vars(resource["props"], document["vars"]))


@pytest.fixture(scope="module")
def env(props: dict[str, Any]) -> dict[str, str]:
    variables = props["environmentVariables"]
    assert all(isinstance(value, str) for value in variables.values()), "FC wants string values"
    return dict(variables)


def names_read_by_the_app() -> set[str]:
    """Environment variables the code reads: settings.py, handler.py and serverless/server.py."""
    settings = (ROOT / "serverless" / "settings.py").read_text()
    names = set(re.findall(r'_\w+\(env, "([A-Z][A-Z0-9_]*)"', settings))
    names |= set(re.findall(r'env\.get\("([A-Z][A-Z0-9_]*)"', settings))
    for entry in ("handler.py", "serverless/server.py"):
        names |= set(re.findall(r'environ\.get\("([A-Z][A-Z0-9_]*)"', (ROOT / entry).read_text()))
    return names


def names_documented() -> set[str]:
    """The first column of README's settings tables (the old names' table aside)."""
    section = (ROOT / "README.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    section = section.split("### Renamed and removed settings", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row)}


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_env() -> dict[str, str]:
    """ENV assignments of the Dockerfile (`ENV A=1 \\ B="x y"`)."""
    text = dockerfile().replace("\\\n", " ")
    pairs: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for token in shlex.split(line[4:]):
                name, _, value = token.partition("=")
                pairs[name] = value
    return pairs


def test_s_yaml_env_var_names_are_settings_the_app_reads_and_documents(env):
    read, documented = names_read_by_the_app(), names_documented()
    assert "COMFYUI_URL" in read and "DRAIN_TIMEOUT" in read and "LOG_LEVEL" in read  # the grep works
    assert set(env) <= read, f"not read by the app: {sorted(set(env) - read)}"
    assert set(env) <= documented, f"not in README's settings table: {sorted(set(env) - documented)}"
    Settings.from_env(env)  # and every value is one the app accepts


def test_s_yaml_runs_the_image_entrypoint_on_port_9000_with_the_health_check(props):
    container = props["customContainerConfig"]
    assert props["runtime"] == "custom-container"
    assert container["port"] == 9000
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", dockerfile(), re.MULTILINE)
    assert entrypoint and container["entrypoint"] == json.loads(entrypoint[1])
    assert "command" not in container  # bootstrap takes no arguments on FC (--emulator is for dev)
    check = container["healthCheckConfig"]
    assert check["httpGetUrl"] == "/api/serverless/health"
    # FC's CustomHealthCheckConfig ranges
    assert 0 <= check["initialDelaySeconds"] <= 120 and 1 <= check["periodSeconds"] <= 120
    assert 1 <= check["timeoutSeconds"] <= 3
    assert 1 <= check["failureThreshold"] <= 120 and 1 <= check["successThreshold"] <= 120


def test_s_yaml_hooks_and_health_path_are_routes_of_the_app(props):
    paths = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    assert {"/api/serverless/health", "/initialize", "/pre-stop"} <= paths
    hooks = props["instanceLifecycleConfig"]
    for hook in ("initializer", "preStop"):
        assert hooks[hook]["handler"] and hooks[hook]["timeout"] >= 1


def test_s_yaml_timeouts_nest(props, env):
    """Each bound ends before the one FC enforces around it."""
    hooks = props["instanceLifecycleConfig"]
    assert float(env["DRAIN_TIMEOUT"]) < hooks["preStop"]["timeout"]
    assert float(env["COMFYUI_STARTUP_TIMEOUT"]) < hooks["initializer"]["timeout"]
    assert float(env["JOB_TIMEOUT"]) < props["timeout"]
    check = props["customContainerConfig"]["healthCheckConfig"]
    # a starting (or restarting) ComfyUI is given its start-up time before FC gives up on the instance
    unhealthy_for = check["initialDelaySeconds"] + check["periodSeconds"] * check["failureThreshold"]
    assert unhealthy_for >= float(env["COMFYUI_STARTUP_TIMEOUT"])


def test_s_yaml_mounts_the_nas_where_status_logs_and_outputs_go(props, env):
    mounts = props["nasConfig"]["mountPoints"]
    assert [m["mountDir"] for m in mounts] == [MOUNT]
    assert all(m["serverAddr"] for m in mounts)
    assert {"userId", "groupId"} <= set(props["nasConfig"])  # required by the fc3 schema
    assert props["vpcConfig"]  # a NAS mount target is reached through the function's VPC
    assert env["MODEL_ASSET_DIR"] == MOUNT
    assert Settings.from_env(env).status.dir.is_relative_to(MOUNT)
    assert f"--output-directory {MOUNT}/output" in dockerfile_env()["COMFYUI_CMD"]


def test_s_yaml_is_a_gpu_function_with_a_role_async_tasks_and_an_http_trigger(props):
    gpu = props["gpuConfig"]
    assert gpu["gpuType"].startswith("fc.gpu.") and gpu["gpuMemorySize"] % 1024 == 0
    assert 1 <= props["instanceConcurrency"] <= 200
    assert props["role"].startswith("acs:ram::")
    assert props["asyncInvokeConfig"]["asyncTask"] is True
    [trigger] = props["triggers"]
    assert trigger["triggerType"] == "http"


def test_s_yaml_http_trigger_takes_every_method_of_the_apps_routes(props):
    """Hosted workflows are registered with PUT and removed with DELETE: a trigger without them
    answers FC's own error, never reaching the app."""
    app = create_app(Settings())
    used = {method for route in app.routes for method in getattr(route, "methods", None) or ()} - {"HEAD"}
    [trigger] = props["triggers"]
    assert used == {"GET", "POST", "PUT", "DELETE"} and used <= set(trigger["triggerConfig"]["methods"])


def test_the_files_the_deployment_files_refer_to_exist():
    for name in ("s.yaml", "Dockerfile", "bootstrap"):
        ours = [line for line in (ROOT / name).read_text().splitlines() if "://" not in line]  # not another repo's
        for mentioned in re.findall(r"\b((?:docs|deploy|examples|scripts)/[\w./-]+\.\w+)", "\n".join(ours)):
            assert (ROOT / mentioned).exists(), f"{name} refers to {mentioned}, which does not exist"


def test_dockerfile_starts_bootstrap_with_comfyui_supervised_from_app_comfyui():
    text = dockerfile()
    assert re.search(r'^ENTRYPOINT \["/app/bootstrap"\]$', text, re.MULTILINE)
    assert re.search(r"^EXPOSE 9000$", text, re.MULTILINE)
    variables = dockerfile_env()
    assert variables["COMFYUI_DIR"] == "/app/ComfyUI"
    command = shlex.split(variables["COMFYUI_CMD"])
    assert command[1] == "/app/ComfyUI/main.py"
    port = command[command.index("--port") + 1]
    assert variables["COMFYUI_URL"] == f"http://127.0.0.1:{port}"
    assert set(variables) & names_documented() <= names_read_by_the_app()
    assert "base_path: /mnt/auto/models" in text


def test_dockerignore_keeps_what_the_dockerfile_copies():
    sources = copied_sources()
    assert {"requirements.txt", "bootstrap", "handler.py", "serverless"} <= set(sources)
    patterns = dockerignore_patterns()
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), source
    assert ".venv" in patterns and ".git" in patterns and "tests" in patterns


def copied_sources() -> list[str]:
    """The build-context paths the Dockerfile COPYs (heredocs and flags left out)."""
    return [
        src
        for line in dockerfile().splitlines()
        if line.startswith("COPY ") and "<<" not in line
        for src in [part for part in line.split()[1:-1] if not part.startswith("--")]
    ]


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_the_image_gets_no_emulator_tests_or_benchmarks():
    """The emulator is a development tool: outside the build context and outside what is copied."""
    patterns = dockerignore_patterns()
    for tool in ("comfyui_emulator", "tests", "bench"):
        assert tool in patterns, f".dockerignore lets {tool}/ into the build context"
        assert not any(source == tool or source.startswith(f"{tool}/") for source in copied_sources())
    assert set(copied_sources()) == {"requirements.txt", "bootstrap", "handler.py", "serverless"}
    copied = [path for source in copied_sources() for path in [ROOT / source, *(ROOT / source).rglob("*")]]
    assert not [path for path in copied if "emulator" in path.name], "the production package holds an emulator"
    for path in copied:
        if path.suffix == ".py":
            assert "comfyui_emulator" not in path.read_text(), f"{path} knows the emulator"
    # The one exception, a development convenience: `bootstrap --emulator` (the emulator is not in the image).
    assert "-m comfyui_emulator" in (ROOT / "bootstrap").read_text()


def test_pip_install_packages_serverless_and_handler_with_the_runtime_requirements():
    """pyproject.toml: every `serverless*` package, handler.py, the requirements.txt ranges, no emulator."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["serverless*"]
    assert setuptools["py-modules"] == ["handler"]
    assert project["project"]["dynamic"] == ["version"]
    assert setuptools["dynamic"]["version"] == {"attr": "serverless.__version__"}
    runtime = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert project["project"]["dependencies"] == [line for line in runtime if line]
    extra = {re.split(r"[<>=\[]", req)[0] for req in project["project"]["optional-dependencies"]["emulator"]}
    imported = {
        match
        for path in (ROOT / "comfyui_emulator").rglob("*.py")
        for match in re.findall(r"^(?:from|import) ([A-Za-z_]\w*)", path.read_text(), re.MULTILINE)
    }
    assert imported - set(sys.stdlib_module_names) - {"comfyui_emulator"} == {"aiohttp", "PIL"}
    assert extra == {"aiohttp", "pillow"}  # the emulator extra covers them


def test_bootstrap_is_an_executable_bash_script():
    path = ROOT / "bootstrap"
    assert path.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bootstrap_help_prints_usage_and_starts_nothing(flag, tmp_path):
    # PYTHON names a program that leaves a mark: bootstrap must exit before exec'ing anything.
    marker = tmp_path / "started"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [str(ROOT / "bootstrap"), flag],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0 and not marker.exists()
    for documented in ("--emulator", "EMULATOR_PORT", "EMULATOR_ROOT", "step_delay", "node_delay", "/emulator/config"):
        assert documented in result.stdout
    refused = subprocess.run(
        [str(ROOT / "bootstrap"), "--bogus"],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert refused.returncode == 2 and "Usage" in refused.stderr and not marker.exists()


def test_s_yaml_sizes_are_within_the_fc3_schema(props):
    """Ranges from the fc3 component's schema (devsapp/fc3 src/schema.json) and FC's limits."""
    assert props["diskSize"] in (512, 10240)
    assert props["memorySize"] % 64 == 0 and 128 <= props["memorySize"] <= 32768
    assert 0.05 <= props["cpu"] <= 16 and 1 <= props["memorySize"] / 1024 / props["cpu"] <= 4
    assert 1 <= props["timeout"] <= 86400
    gpu = props["gpuConfig"]
    assert gpu["gpuType"] in ("fc.gpu.tesla.1", "fc.gpu.ampere.1", "fc.gpu.ada.1")
    assert 1024 <= gpu["gpuMemorySize"] and gpu["gpuMemorySize"] % 1024 == 0
    asynchronous = props["asyncInvokeConfig"]
    assert 1 <= asynchronous["maxAsyncEventAgeInSeconds"] <= 2592000
    assert 0 <= asynchronous["maxAsyncRetryAttempts"] <= 8


def test_every_variable_the_app_reads_is_in_readmes_settings_table():
    read = names_read_by_the_app()
    assert {"HOST", "FC_CUSTOM_LISTEN_PORT", "LOG_LEVEL", "LOG_FORMAT", "JOB_TIMEOUT"} <= read  # the grep works
    assert read <= names_documented(), f"not in README's settings table: {sorted(read - names_documented())}"


def test_the_image_listens_on_all_addresses_of_its_container():
    """Outside FC the default HOST is loopback, which `docker run -p` could not reach."""
    assert dockerfile_env()["HOST"] == "0.0.0.0"
    assert Settings.from_env(dockerfile_env()).service.host == "0.0.0.0"
