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

    hosts = Settings.from_env({"INPUT_ALLOWED_HOSTS": value}).input_allowed_hosts

    assert hosts == tuple(part.strip() for part in value.split(","))


def test_server_settings_default_to_loopback_port_9000_text_logs_and_no_access_log():
    settings = Settings.from_env({})

    assert (settings.service.host, settings.service.port) == ("127.0.0.1", 9000)
    assert (settings.service.log_level, settings.service.log_format, settings.service.access_log) == ("INFO", "text", False)


def test_on_fc_the_server_listens_on_all_addresses_unless_host_says_otherwise():
    assert Settings.from_env({"FC_FUNCTION_NAME": "comfyui"}).host == "0.0.0.0"
    assert Settings.from_env({"FC_FUNCTION_NAME": "comfyui", "HOST": "127.0.0.2"}).host == "127.0.0.2"


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
    assert (settings.service.log_level, settings.service.log_format, settings.service.access_log) == ("DEBUG", "json", True)


ENTRY_POINTS = {
    "server": [sys.executable, "-m", "serverless.server"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "handler:app", "--port", "0"],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FC_CUSTOM_LISTEN_PORT", "abc", "FC_CUSTOM_LISTEN_PORT='abc': not a number"),
        ("LOG_LEVEL", "verbose", "LOG_LEVEL='verbose': must be one of debug, info, warning, error, critical"),
        ("INPUT_ALLOWED_HOSTS", "10.0.0.0/33", "INPUT_ALLOWED_HOSTS='10.0.0.0/33': '10.0.0.0/33' is not an IP "),
    ],
)
def test_an_entry_point_with_a_bad_setting_prints_one_line_and_exits_2(entry, name, value, message, tmp_path):
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
