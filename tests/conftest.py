"""Shared fixtures: a ComfyUI emulator process and app processes under uvicorn, on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import App, Emulator, free_port


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One emulator for tests that do not disturb it (no kills, no dropped sockets)."""
    server = Emulator(tmp_path_factory.mktemp("emulator"))
    yield server
    server.stop()


@pytest.fixture
def own_emulator(tmp_path: Path) -> Iterator[Emulator]:
    """A fresh emulator for a test that breaks things."""
    server = Emulator(tmp_path / "emulator")
    yield server
    server.stop()


def base_env(comfyui_url: str, status_dir: Path) -> dict[str, str]:
    return {
        "COMFYUI_URL": comfyui_url,
        "STATUS_DIR": str(status_dir),
        "FC_INSTANCE_ID": "test-1",
        "COMFYUI_RECONNECT_TIMEOUT": "5",
    }


@pytest.fixture(scope="session")
def app(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The app against the shared emulator, with default settings."""
    logs = tmp_path_factory.mktemp("app")
    server = App(logs, base_env(emulator.url, logs / "status"))
    yield server
    server.stop()


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    """Start apps with custom settings: `start_app(comfyui_url, **env)`; stopped after the test."""
    started: list[App] = []

    def start(comfyui_url: str, status_dir: Path | None = None, **env: str) -> App:
        settings = base_env(comfyui_url, status_dir or tmp_path / "status")
        server = App(tmp_path, {**settings, **env})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
