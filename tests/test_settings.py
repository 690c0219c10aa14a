"""Settings read from the environment: every bad value is refused with the variable's name, and
both entry points say so in one line on stderr and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serverless.settings import Settings, SettingsError
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
        ("ACCESS_LOG", "maybe", "true or false"),
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
            "ACCESS_LOG": "true",
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
    assert (settings.outputs.link_expires, settings.outputs.link_max_expires) == (60, 60)
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


def test_a_server_started_with_an_old_setting_name_logs_one_warning_line_and_serves(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "STATUS_DIR": str(tmp_path / "status"),
        "WORKFLOWS_DIR": str(tmp_path / "workflows"),
        "COMFYUI_URL": f"http://127.0.0.1:{free_port()}",
        "FC_CUSTOM_LISTEN_PORT": str(port),
        "BODY_TIMEOUT": "5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "serverless.server"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        lines = []
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "Started server process" in line or "Traceback" in line:
                break
        warnings = [line for line in lines if "deprecated" in line]
        assert len(warnings) == 1 and "BODY_TIMEOUT is deprecated: read as INPUT_TIMEOUT=5" in warnings[0], lines
    finally:
        process.terminate()
        process.wait(timeout=30)
