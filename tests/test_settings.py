"""Settings read from the environment: every bad value is refused with the variable's name, and
both entry points say so in one line on stderr and exit 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import requests

from serverless.settings import REMOVED, RENAMED, Settings, SettingsError
from tests.servers import ROOT, free_port


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("FC_CUSTOM_LISTEN_PORT", "abc", "not a number"),
        ("FC_CUSTOM_LISTEN_PORT", "0", "at least 1"),
        ("FC_CUSTOM_LISTEN_PORT", "65536", "at most 65535"),
        ("FC_CUSTOM_LISTEN_PORT", "inf", "whole number"),
        ("LOG_LEVEL", "verbose", "one of debug, info, warning, error, critical"),
        ("LOG_FORMAT", "xml", "one of text, json"),
        ("CANCEL_ON_DISCONNECT", "maybe", "true or false"),
        ("HOST", "1.2.3", "not an IP address or host name"),
        ("HOST", "my host", "not an IP address or host name"),
        ("DRAIN_TIMEOUT", "nan", "at least 0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable_and_the_value(name, value, reason):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({name: value})

    assert str(error.value).startswith(f"{name}={value!r}: ")
    assert reason in str(error.value)


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.0/33",
        "10.0.0.0/8/8",
        "999.1.1.1",
        "10.0.0",
        "1::2::3",
        "images/internal",
        "*.example.com",
        "bad_name.example",
        "-x.example",
    ],
)
def test_an_input_allowed_hosts_entry_that_is_neither_network_nor_host_name_is_refused_by_name(entry):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"INPUT_ALLOWED_HOSTS": f"images.internal, {entry}"})

    assert str(error.value).startswith("INPUT_ALLOWED_HOSTS=")
    assert repr(entry) in str(error.value)


def test_input_allowed_hosts_takes_host_names_addresses_and_networks():
    value = "Images.Internal., 10.0.0.0/8, 10.1.2.3/8, 192.168.1.7, ::1, [::1], fe80::/10, localhost"

    hosts = Settings.from_env({"INPUT_ALLOWED_HOSTS": value}).inputs.allowed_hosts

    assert hosts == tuple(part.strip() for part in value.split(","))


def test_server_settings_default_to_loopback_port_9000_text_logs_and_no_access_log():
    settings = Settings.from_env({})

    assert (settings.service.host, settings.service.port) == ("127.0.0.1", 9000)
    assert (settings.service.log_level, settings.service.log_format, settings.service.access_log) == (
        "INFO",
        "text",
        False,
    )


def test_on_fc_the_server_listens_on_all_addresses_unless_host_says_otherwise():
    assert Settings.from_env({"FC_FUNCTION_NAME": "comfyui"}).service.host == "0.0.0.0"
    assert Settings.from_env({"FC_FUNCTION_NAME": "comfyui", "HOST": "127.0.0.2"}).service.host == "127.0.0.2"


def test_server_settings_are_read_from_their_variables():
    settings = Settings.from_env(
        {
            "HOST": "::",
            "FC_CUSTOM_LISTEN_PORT": "8080",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "JSON",
        }
    )

    assert (settings.service.host, settings.service.port) == ("::", 8080)
    assert (settings.service.log_level, settings.service.log_format, settings.service.access_log) == (
        "DEBUG",
        "json",
        True,
    )


ENTRY_POINTS = {
    "server": [sys.executable, "-m", "serverless.server"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "handler:app", "--port", "0"],
}


BAD_SETTINGS = [
    ("FC_CUSTOM_LISTEN_PORT", "abc", "FC_CUSTOM_LISTEN_PORT='abc': not a number"),
    ("LOG_LEVEL", "verbose", "LOG_LEVEL='verbose': must be one of debug, info, warning, error, critical"),
    ("INPUT_ALLOWED_HOSTS", "10.0.0.0/33", "INPUT_ALLOWED_HOSTS='10.0.0.0/33': '10.0.0.0/33' is not an IP "),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
def test_a_bad_setting_is_refused_with_one_line_naming_it(name, value, message):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"COMFYUI_URL": "http://127.0.0.1:8188", name: value})

    [line] = str(refused.value).splitlines()
    assert line.startswith(message)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("entry", "bad"), list(zip(ENTRY_POINTS, BAD_SETTINGS, strict=False)))
def test_an_entry_point_with_a_bad_setting_prints_one_line_and_exits_2(entry, bad, tmp_path):
    """Each entry point in a process of its own (its exit code is the point), each with another of
    the bad settings; every message is checked in-process above."""
    name, value, message = bad
    env = {
        **os.environ,
        "STATUS_DIR": str(tmp_path),
        "COMFYUI_URL": f"http://127.0.0.1:{free_port()}",
        "FC_CUSTOM_LISTEN_PORT": str(free_port()),
        name: value,
    }

    done = subprocess.run(ENTRY_POINTS[entry], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)

    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"settings error: {message}")


def test_settings_are_grouped_by_concern_each_group_read_from_its_own_variables():
    settings = Settings.from_env(
        {
            "COMFYUI_URL": "http://10.0.0.5:8190/",
            "INPUT_MAX_BYTES": "1048576",
            "INPUT_TIMEOUT": "7",
            "FILE_LINK_EXPIRES": "60",
            "STATUS_BACKEND": "redis",
            "QUEUE_BACKEND": "redis",
            "ROLE": "gateway",
            "API_KEYS": "k" * 16,
        }
    )

    assert (settings.comfyui.url, settings.comfyui.host, settings.comfyui.port) == (
        "http://10.0.0.5:8190",
        "10.0.0.5",
        8190,
    )
    assert (settings.inputs.max_bytes, settings.inputs.timeout) == (1048576, 7.0)
    assert settings.outputs.link_expires == 60
    assert (settings.status.backend, settings.fleet.queue_backend, settings.fleet.role) == ("redis", "redis", "gateway")
    assert settings.security.api_keys == ("k" * 16,)
    assert "k" * 16 not in repr(settings)  # secrets stay out of every repr, grouped or not
    assert settings.deprecated == ()


@pytest.mark.parametrize(
    ("old", "new", "value", "read"),
    [
        ("INPUT_MAX_BASE64_BYTES", "INPUT_MAX_BYTES", "2048", lambda s: s.inputs.max_bytes),
        ("MAX_INPUT_BYTES_PER_JOB", "INPUT_MAX_JOB_BYTES", "4096", lambda s: s.inputs.max_job_bytes),
        ("BODY_TIMEOUT", "INPUT_TIMEOUT", "3", lambda s: s.inputs.timeout),
        ("COMFYUI_RECONNECT_TIMEOUT", "COMFYUI_STARTUP_TIMEOUT", "9", lambda s: s.comfyui.startup_timeout),
    ],
)
def test_a_merged_settings_old_name_keeps_working_with_one_deprecation_line(old, new, value, read):
    settings = Settings.from_env({old: value})

    assert read(settings) == float(value)
    assert settings.deprecated == (f"{old} is deprecated: read as {new}={value}",)

    both = Settings.from_env({old: value, new: "5"})  # the new name wins, and the old is named as ignored
    assert read(both) == 5
    assert both.deprecated == (f"{old} is deprecated and ignored: {new} is set",)


@pytest.mark.parametrize(
    ("old", "new", "read"),
    [
        ("GENSTUDIO_TOKEN_SECRET", "FILE_LINK_SECRET", lambda s: s.security.file_link_secret),
    ],
)
def test_a_merged_secrets_old_name_keeps_working_and_its_warning_never_shows_the_secret(old, new, read):
    secret = "s3cret-value-0123456789"
    settings = Settings.from_env({old: secret})

    assert read(settings) == secret
    assert settings.deprecated == (f"{old} is deprecated: read as {new}",)
    assert secret not in repr(settings)


@pytest.mark.parametrize("old", sorted(REMOVED))
def test_a_removed_setting_is_ignored_with_one_line_saying_why(old):
    settings = Settings.from_env({old: "1"})  # even a value it would once have refused is no error

    assert replace(settings, deprecated=()) == Settings.from_env({})
    [line] = settings.deprecated
    assert line == f"{old} is no longer read: {REMOVED[old]}"


def test_what_replaced_a_removed_setting_follows_its_setting():
    settings = Settings.from_env(
        {"STATUS_STALE_AFTER": "16", "INPUT_MAX_BYTES": "1000", "INPUT_MAX_JOB_BYTES": "3000", "LOG_LEVEL": "debug"}
    )

    assert settings.batches.lease_seconds == 2  # a feeder's lease: an eighth of STATUS_STALE_AFTER
    assert settings.inputs.max_inflight_bytes == 4000  # one request at its limits
    assert settings.service.access_log  # at LOG_LEVEL=debug
    assert Settings.from_env({}).batches.lease_seconds == 15


def test_the_readme_documents_each_setting_read_once_and_they_are_clearly_fewer_than_70():
    from tests.test_deploy_files import names_documented, names_read_by_the_app

    others = ("FC_", "AWS_", "ALIBABA_", "MALLOC_")  # the platform's, the credentials', glibc's
    own = {name for name in names_read_by_the_app() if not name.startswith(others)}
    documented = {name for name in names_documented() if not name.startswith(others)}
    assert documented == own, (sorted(documented - own), sorted(own - documented))
    section = (ROOT / "README.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.split("### Renamed", 1)[0].splitlines() if line.startswith("| `")]
    firsts = [row.split("`")[1] for row in rows]
    assert len(firsts) == len(set(firsts)), "a setting documented twice"
    old_rows = [
        line.split("|")[1] for line in section.split("### Renamed", 1)[1].splitlines() if line.startswith("| `")
    ]
    old = {name for row in old_rows for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row)}
    assert old == set(RENAMED) | set(REMOVED), "each old name in the README's table"
    assert len(own) <= 64 < 70
    assert not own & (set(RENAMED) | set(REMOVED)), "an old name is read again"


def test_a_server_started_with_an_old_setting_name_logs_one_warning_line_and_serves(start_app, dead_url, tmp_path):
    """The app in-process: building it logs the lines, whatever starts it (`python -m
    serverless.server` or uvicorn, each with its logging set up before the app is built)."""
    server = start_app(dead_url, WORKFLOWS_DIR=str(tmp_path / "workflows"), BODY_TIMEOUT="5", STREAM_PING_INTERVAL="1")
    lines = server.log_text().splitlines()
    warnings = [line for line in lines if "deprecated" in line or "no longer read" in line]
    assert len(warnings) == 2, lines
    assert "WARNING" in warnings[0] and "BODY_TIMEOUT is deprecated: read as INPUT_TIMEOUT=5" in warnings[0], lines
    assert "STREAM_PING_INTERVAL is no longer read: a stream sends ': ping' after 15 s" in warnings[1], lines
    assert requests.get(server.url + "/api/serverless/status", params={"task_id": "probe"}, timeout=10).ok
