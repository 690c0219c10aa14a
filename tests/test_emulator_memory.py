"""The emulator's memory, as a GPU's costs a real ComfyUI: a checkpoint loader that runs takes its
load time and puts the checkpoint in VRAM (a repeat of the same checkpoint is cached: no load);
`/system_stats` reports the VRAM it takes; `POST /free` unloads; a fault knob runs a sampler out
of memory as torch does, reported in `execution_error` as ComfyUI reports it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.helpers import txt2img
from tests.servers import InProcessEmulator as Emulator
from tests.test_emulator_nodes import run

GiB = 1 << 30


@pytest.fixture
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    server = Emulator(tmp_path_factory.mktemp("emu"), step_delay=0.0)
    yield server
    server.stop()


def _configure(emu: Emulator, **knobs: float) -> None:
    assert requests.post(emu.url + "/emulator/config", json=knobs, timeout=5).ok


def _with(ckpt: str, seed: int) -> dict[str, Any]:
    workflow = txt2img(seed=seed, steps=1)
    workflow["4"]["inputs"]["ckpt_name"] = ckpt
    return workflow


def _device(emu: Emulator) -> dict[str, Any]:
    device: dict[str, Any] = requests.get(emu.url + "/system_stats", timeout=5).json()["devices"][0]
    return device


def _timed(emu: Emulator, prompt: dict[str, Any]) -> float:
    began = time.monotonic()
    run(emu, prompt)
    return time.monotonic() - began


def test_a_checkpoint_costs_its_load_once_until_another_replaces_it(emu: Emulator) -> None:
    _configure(emu, model_load_delay=0.5, model_bytes=4 * GiB, vram_total=24 * GiB)
    assert _device(emu)["type"] == "cuda" and _device(emu)["vram_free"] == 24 * GiB
    assert _timed(emu, _with("v1-5-pruned-emaonly.safetensors", 1)) >= 0.5
    assert _device(emu)["vram_free"] == 20 * GiB
    assert _timed(emu, _with("v1-5-pruned-emaonly.safetensors", 2)) < 0.5, "held: the loader's output is cached"
    assert _timed(emu, _with("sd_xl_base_1.0.safetensors", 3)) >= 0.5, "another checkpoint is loaded"
    assert _timed(emu, _with("v1-5-pruned-emaonly.safetensors", 4)) >= 0.5, "and the first one again"
    assert _device(emu)["vram_free"] == 20 * GiB, "one checkpoint held at a time"

    assert requests.post(emu.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=5).ok
    time.sleep(0.7)  # applied by the prompt worker between prompts (it wakes for it)
    assert _device(emu)["vram_free"] == 24 * GiB
    assert _timed(emu, _with("v1-5-pruned-emaonly.safetensors", 5)) >= 0.5, "freed: loaded again"


def test_an_out_of_memory_sampler_is_reported_as_comfyui_reports_torch_s(emu: Emulator) -> None:
    _configure(emu, oom_next=1, model_bytes=4 * GiB, vram_total=24 * GiB)
    messages, history = run(emu, _with("v1-5-pruned-emaonly.safetensors", 1))
    error = next(m["data"] for m in messages if m["type"] == "execution_error")
    assert error["exception_type"] == "torch.OutOfMemoryError"
    assert "ran out of memory on your GPU" in error["exception_message"]
    assert history["status"]["status_str"] == "error"
    assert _device(emu)["vram_free"] == 24 * GiB, "ComfyUI unloads every model after an OOM"
    messages, history = run(emu, _with("v1-5-pruned-emaonly.safetensors", 2))
    assert history["status"]["status_str"] == "success", "only the next sampler"
