"""The co-located fast path: one ComfyUI websocket for the whole instance, outputs read from and
inputs written to ComfyUI's folders when they are on our disk.

End to end against the emulator: 20 concurrent jobs, each stream compared with what ComfyUI sent
to the adapter's one client id; the shared socket cut while jobs run and wait; outputs read from
disk while `/view` is broken. The confinement of history paths to ComfyUI's folder is tested on
the client's own function with a real temp folder (the emulator cannot write such a history).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import io
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from PIL import Image

from serverless.comfyui import folders as comfyui_folders_module
from serverless.comfyui.client import ComfyUI, Timeouts
from serverless.comfyui.folders import (
    CACHED_UP_TO,
    Folders,
    confined,
    filesystem_type,
    read_cached,
    read_item,
    started_folders,
)
from serverless.core.messages import Message
from serverless.core.previews import PreviewFrame
from serverless.errors import InputError, OutputError
from serverless.resources import comfyui_folders
from serverless.settings import Settings
from tests.helpers import comfyui_texts, empty_image, post_run, txt2img, wait_until
from tests.test_comfyapi import ExampleClient, address
from tests.test_stream import (
    TERMINAL_TYPES,
    assert_forwarded_as_sent,
    client_id_of,
    in_background,
    prompt_id_of,
    prompt_ids,
    read_events,
    sent_to,
    set_step_delay,
    status_log,
    stream,
)

pytestmark = pytest.mark.timeout(120)
B64 = {"output_base64": "true"}


def run_stream(base_url: str, workflow: dict[str, Any]) -> list[str]:
    with stream(base_url, workflow) as response:
        assert response.status_code == 200
        return [str(event.data) for event in read_events(response) if event.data is not None]


# -- one websocket, messages routed by prompt ---------------------------------------------------------


def test_twenty_concurrent_streams_each_hold_exactly_their_own_messages(app, emulator):
    workflows = [txt2img(seed=500 + k, steps=3, prefix=f"routed-{k}") for k in range(20)]
    with ThreadPoolExecutor(20) as pool:
        streams = list(pool.map(lambda w: run_stream(app.url, w), workflows))

    prompt_ids = set()
    for texts in streams:
        terminal = json.loads(texts[-1])
        assert terminal["type"] == "serverless_api", terminal
        prompt_id = terminal["data"]["prompt_id"]
        prompt_ids.add(prompt_id)
        forwarded = comfyui_texts(texts[:-1])
        assert_forwarded_as_sent(forwarded, sent_to(emulator.url, prompt_id), prompt_id)
    assert len(prompt_ids) == 20
    # One client id for the instance: every job was submitted with it.
    assert len({client_id_of(emulator.url, prompt_id) for prompt_id in prompt_ids}) == 1


def test_cutting_the_shared_socket_recovers_every_running_and_waiting_job(own_emulator, start_app):
    set_step_delay(own_emulator, 0.02)
    server = start_app(own_emulator.url)
    workflows = [txt2img(seed=600 + k, steps=40, prefix=f"cut-{k}") for k in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(run_stream, server.url, w) for w in workflows]
        wait_until(lambda: len(requests.get(own_emulator.url + "/queue", timeout=5).json()["queue_pending"]) >= 3)
        dropped = requests.post(own_emulator.url + "/emulator/drop_websockets", timeout=5).json()["dropped"]
        streams = [future.result(timeout=90) for future in futures]

    assert dropped == 1, "the instance holds one websocket to ComfyUI, whatever the number of jobs"
    for texts in streams:
        terminal = json.loads(texts[-1])
        assert terminal["type"] == "serverless_api", terminal
        prompt_id = terminal["data"]["prompt_id"]
        forwarded = comfyui_texts(texts[:-1])
        assert not [t for t in forwarded if json.loads(t)["type"] in TERMINAL_TYPES]
        assert not [t for t in forwarded if prompt_id_of(t) not in (None, prompt_id)], "another job's message"
    assert server.log_text().count("websocket lost: reconnecting") == 1


# -- outputs read from ComfyUI's folder ------------------------------------------------------------------


def configure(emulator: Any, **knobs: float) -> None:
    requests.post(emulator.url + "/emulator/config", json=knobs, timeout=5).raise_for_status()


def test_outputs_read_from_disk_are_the_bytes_view_serves_even_while_view_fails(own_emulator, start_app):
    root = own_emulator.root
    server = start_app(own_emulator.url, COMFYUI_OUTPUT_DIR=str(root / "output"))  # its temp folder beside it
    workflow = empty_image(width=32, height=24, color=0x336699, prefix="disk/out")
    workflow["3"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}  # a temp output too
    configure(own_emulator, view_status=500)  # /view is broken: only the disk can serve the outputs
    try:
        response = post_run(server.url, workflow, params=B64)
    finally:
        configure(own_emulator, view_status=0)

    assert response.status_code == 200, response.text
    results = response.json()["data"]["results"]
    assert {r["output"]["raw"]["type"] for r in results} == {"output", "temp"}
    for result in results:
        raw = result["output"]["raw"]
        view = requests.get(
            own_emulator.url + "/view",
            timeout=5,
            params={"filename": raw["filename"], "subfolder": raw["subfolder"], "type": raw["type"]},
        )
        assert view.status_code == 200
        assert base64.b64decode(result["output"]["base64"]["content"]) == view.content
        assert result["output"]["bytes"] == len(view.content) and result["output"]["mime"] == "image/png"


def test_view_and_links_serve_an_output_from_comfyuis_folder_on_our_disk_even_while_view_fails(own_emulator, start_app):
    root = own_emulator.root
    server = start_app(own_emulator.url, COMFYUI_OUTPUT_DIR=str(root / "output"), FILE_LINK_SECRET="s" * 32)
    response = post_run(
        server.url, empty_image(32, 24, color=0x224466, prefix="disk/view"), params={"output_url": "true"}
    )
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    raw = result["output"]["raw"]
    made = (root / "output" / raw["subfolder"] / raw["filename"]).read_bytes()
    configure(own_emulator, view_status=500)  # only the disk can serve it now
    try:
        view = requests.get(server.url + "/view", params=raw, timeout=5)
        part = requests.get(server.url + "/api/view", params=raw, headers={"Range": "bytes=0-7"}, timeout=5)
        link = requests.get(result["output"]["url"], timeout=5)
    finally:
        configure(own_emulator, view_status=0)
    assert view.status_code == 200 and view.content == made and view.headers["content-type"] == "image/png"
    assert part.status_code == 206 and part.content == made[:8]
    assert part.headers["content-range"] == f"bytes 0-7/{len(made)}"
    assert link.status_code == 200 and link.content == made


def test_a_comfyui_clients_view_of_an_output_its_job_just_read_answers_from_memory(own_emulator, start_app):
    """ComfyUI's API on a co-located box: the job reads each output whole as it tells its size, and
    the client's `/view` right after `/history` is answered from those bytes (here with the file
    gone from the folder and ComfyUI's `/view` failing: nothing else could serve it); a `HEAD` is
    ComfyUI's own answer, as before."""
    root = own_emulator.root
    server = start_app(own_emulator.url, COMFYUI_OUTPUT_DIR=str(root / "output"))
    client = ExampleClient(address(server.url))
    images = client.run(empty_image(20, 12, color=0x446688, prefix="kept/view"))
    ((made,),) = images.values()
    (path,) = (root / "output" / "kept").glob("view_*.png")
    assert path.read_bytes() == made
    path.unlink()
    configure(own_emulator, view_status=500)
    try:
        params = {"filename": path.name, "subfolder": "kept", "type": "output"}
        view = requests.get(server.url + "/view", params=params, timeout=5)
        head = requests.head(server.url + "/view", params=params, timeout=5)
    finally:
        configure(own_emulator, view_status=0)
    assert view.status_code == 200 and view.content == made and view.headers["content-type"] == "image/png"
    assert head.status_code != 200  # ComfyUI's `/view` answered it


def test_an_output_missing_from_the_folder_is_fetched_through_view(own_emulator, start_app, tmp_path):
    server = start_app(own_emulator.url, COMFYUI_OUTPUT_DIR=str(tmp_path / "elsewhere"))
    response = post_run(server.url, empty_image(color=0x123456, prefix="disk/missing"), params=B64)
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    assert Image.open(io.BytesIO(base64.b64decode(result["output"]["base64"]["content"]))).size == (16, 16)


@pytest.mark.parametrize(
    "subfolder, filename",
    [
        ("", "../secret.txt"),
        ("..", "secret.txt"),
        ("a/../..", "secret.txt"),
        ("", "/etc/passwd"),
        ("/etc", "passwd"),
        ("", "link/secret.txt"),  # a symlink inside the folder that leads out of it
        ("", ""),
    ],
)
def test_a_history_path_leading_outside_the_folder_is_refused(tmp_path, subfolder, filename):
    folder = tmp_path / "output"
    (folder / "ok").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("not an output")
    (folder / "link").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="refused"):
        confined(folder, subfolder, filename)


@pytest.mark.parametrize("by_name", [True, False], ids=["kernel-named", "resolved-first"])
@pytest.mark.parametrize(
    ("subfolder", "filename"),
    [
        ("..", "secret.txt"),
        ("a/../..", "secret.txt"),
        ("link", "secret.txt"),  # a symlinked subfolder that leads out of the folder
        ("a", "out.png"),  # a symlinked file in a subfolder that leads out of it
        ("", "out.png"),
        ("a/..", "missing/../../secret.txt"),
    ],
)
def test_an_output_read_whole_outside_the_folder_is_refused(tmp_path, monkeypatch, by_name, subfolder, filename):
    """`read_item` with its content (an output the job and `/view` read whole): a path leading out
    of the folder is refused, whether the kernel names the file it opened or the path is resolved
    first (where /proc is not there)."""
    monkeypatch.setattr(comfyui_folders_module, "NAMES_OPEN_FILES", by_name)
    folder = tmp_path / "output"
    (folder / "a").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("not an output")
    (folder / "link").symlink_to(tmp_path)
    (folder / "a" / "out.png").symlink_to(tmp_path / "secret.txt")
    (folder / "out.png").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(OutputError, match="refused"):
        read_item(folder, subfolder, filename, True)


@pytest.mark.parametrize("by_name", [True, False], ids=["kernel-named", "resolved-first"])
def test_an_output_read_whole_in_a_subfolder_is_read_as_view_serves_it(tmp_path, monkeypatch, by_name):
    monkeypatch.setattr(comfyui_folders_module, "NAMES_OPEN_FILES", by_name)
    folder = tmp_path / "output"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.png").write_bytes(b"\x89PNG fake")
    (folder / "a" / "page.html").write_bytes(b"<p>")
    (folder / "a" / "y.png").symlink_to(folder / "a" / "x.png")  # a link staying inside: its target's type
    (folder / "a" / "z.bin").symlink_to(folder / "a" / "x.png")
    png = (b"\x89PNG fake", "image/png", 9)
    assert read_item(folder, "a", "x.png", True) == png
    assert read_item(folder, "a/../a", "y.png", True) == png
    assert read_item(folder, "", "a/x.png", True) == png
    assert read_item(folder, "a", "z.bin", True) == png  # as `confined`: the type of the file it leads to
    assert read_item(folder, "a", "page.html", True) == (b"<p>", "application/octet-stream", 3)  # as /view
    assert read_item(folder, "a", "x.png", True, 8) is None  # bigger than asked: `/view` streams it
    assert read_item(folder, "a", "missing.png", True) is None
    assert read_item(folder, "", "a", True) is None  # a folder


def test_a_history_path_inside_the_folder_resolves_there(tmp_path):
    folder = tmp_path / "output"
    (folder / "a" / "b").mkdir(parents=True)
    assert confined(folder, "a/b", "x.png") == (folder / "a" / "b" / "x.png").resolve()
    assert confined(folder, "a/../a", "x.png") == (folder / "a" / "x.png").resolve()


def client_call(folders: Folders, call: Any) -> Any:
    """Run `call(comfy)` against a ComfyUI client whose server does not exist (nothing may go
    over the network) and whose folders are `folders`."""

    async def main() -> Any:
        async with aiohttp.ClientSession() as session:
            comfy = ComfyUI(session, "http://127.0.0.1:9", Timeouts(connect=0.5, request=0.5), folders)
            return await call(comfy)

    return asyncio.run(main())


def test_the_client_refuses_a_history_item_naming_parent_folders_without_asking_comfyui(tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "secret.txt").write_bytes(b"secret")
    item = {"filename": "../secret.txt", "subfolder": "", "type": "output"}
    with pytest.raises(OutputError, match="refused"):
        client_call(Folders(output=tmp_path / "output"), lambda comfy: comfy.fetch(item, True))


def test_the_client_reads_an_output_from_disk_without_asking_comfyui(tmp_path):
    (tmp_path / "output" / "sub").mkdir(parents=True)
    (tmp_path / "output" / "sub" / "a.webp").write_bytes(b"RIFF....WEBP")
    item = {"filename": "a.webp", "subfolder": "sub", "type": "output"}
    fetched = client_call(Folders(output=tmp_path / "output"), lambda comfy: comfy.fetch(item, True))
    assert (fetched.content, fetched.content_type, fetched.size) == (b"RIFF....WEBP", "image/webp", 12)
    head = client_call(Folders(output=tmp_path / "output"), lambda comfy: comfy.fetch(item, False))
    assert (head.content, head.size) == (None, 12)


def test_an_output_that_is_a_symlink_is_read_only_when_it_stays_inside_the_folder(tmp_path):
    folder = tmp_path / "output"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "real.png").write_bytes(b"\x89PNG inside")
    (folder / "inside.png").symlink_to(folder / "sub" / "real.png")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    (folder / "outside.png").symlink_to(tmp_path / "secret.png")
    folders = Folders(output=folder)
    inside = {"filename": "inside.png", "subfolder": "", "type": "output"}
    fetched = client_call(folders, lambda comfy: comfy.fetch(inside, True))
    assert (fetched.content, fetched.content_type) == (b"\x89PNG inside", "image/png")
    outside = {"filename": "outside.png", "subfolder": "", "type": "output"}
    with pytest.raises(OutputError, match="refused"):
        client_call(folders, lambda comfy: comfy.fetch(outside, True))


def test_an_output_named_like_a_fifo_or_folder_is_not_read_from_disk(tmp_path):
    folder = tmp_path / "output"
    (folder / "dir.png").mkdir(parents=True)
    os.mkfifo(folder / "fifo.png")  # opening it to read would wait for a writer forever
    for name in ("dir.png", "fifo.png", "missing.png"):
        item = {"filename": name, "subfolder": "", "type": "output"}
        with pytest.raises(OutputError, match=r"could not be reached|answered"):  # then /view, here nobody
            client_call(Folders(output=folder), lambda comfy, item=item: comfy.fetch(item, True))


def test_a_small_output_just_written_is_read_from_the_page_cache_on_the_event_loop(tmp_path, monkeypatch):
    """Once its folder is known (read once in a thread), a small file ComfyUI has just written
    is read without a trip to a thread: the same bytes, type and base64."""
    folder = tmp_path / "output"
    (folder / "sub").mkdir(parents=True)
    (folder / "first.png").write_bytes(b"\x89PNG first")
    folders = Folders(output=folder)
    first = {"filename": "first.png", "subfolder": "", "type": "output"}
    assert client_call(folders, lambda comfy: comfy.fetch(first, True)).content == b"\x89PNG first"
    (folder / "next.png").write_bytes(b"\x89PNG next")
    (folder / "sub" / "deeper.webp").write_bytes(b"RIFF....WEBP")

    async def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read in a thread")

    monkeypatch.setattr("serverless.comfyui.client.asyncio.to_thread", no_thread)
    plain = {"filename": "next.png", "subfolder": "", "type": "output"}
    fetched = client_call(folders, lambda comfy: comfy.fetch(plain, True, base64.b64encode))
    assert (fetched.content, fetched.content_type, fetched.size) == (b"\x89PNG next", "image/png", 9)
    assert fetched.encoded == base64.b64encode(b"\x89PNG next")
    deeper = {"filename": "deeper.webp", "subfolder": "sub", "type": "output"}
    fetched = client_call(folders, lambda comfy: comfy.fetch(deeper, True))
    assert (fetched.content, fetched.content_type, fetched.size) == (b"RIFF....WEBP", "image/webp", 12)


def test_what_could_wait_or_leads_outside_is_never_read_on_the_event_loop(tmp_path):
    folder = tmp_path / "output"
    (folder / "sub").mkdir(parents=True)
    (folder / "small.png").write_bytes(b"\x89PNG")
    assert read_item(folder, "", "small.png", True) is not None  # the folder is known now
    assert read_cached(folder, "", "small.png") == (b"\x89PNG", "image/png", 4)
    (folder / "big.png").write_bytes(bytes(CACHED_UP_TO + 1))
    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    (folder / "outside.png").symlink_to(tmp_path / "secret.png")
    (folder / "sub" / "up").symlink_to(tmp_path)
    os.mkfifo(folder / "fifo.png")
    for subfolder, name in [
        ("", "big.png"),
        ("", "outside.png"),
        ("sub/up", "secret.png"),
        ("", "fifo.png"),
        ("..", "secret.png"),
        ("", "missing.png"),
    ]:
        assert read_cached(folder, subfolder, name) is None, (subfolder, name)
    cold = folder / "cold.png"
    cold.write_bytes(bytes(100_000))
    if evicted(cold):  # not on tmpfs, and only where the kernel lets it go: it may keep a page
        assert read_cached(folder, "", "cold.png") is None, "reading it would wait for the disk"
    elsewhere = tmp_path / "unknown"  # a folder never read in a thread: its filesystem is not known
    elsewhere.mkdir()
    (elsewhere / "a.png").write_bytes(b"\x89PNG")
    assert read_cached(elsewhere, "", "a.png") is None


def evicted(path: Path) -> bool:
    """Whether `path` could be put out of the page cache: written back, dropped, and then told
    by mincore(2), a call the code under test does not use, to hold none of its pages."""
    for _ in range(5):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if cached_pages(path) == 0:
            return True
    return False


def cached_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore over a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)  # a private mapping: reading it faults nothing in
        try:
            if libc.mincore(ctypes.addressof(start), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start  # the mapping closes only once nothing points into it
    return sum(flag & 1 for flag in vector)


def test_a_folder_on_a_network_filesystem_is_always_read_in_a_thread(tmp_path, monkeypatch):
    folder = tmp_path / "nas"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG")
    monkeypatch.setattr(comfyui_folders_module, "filesystem_type", lambda path: "nfs4")
    assert read_item(folder, "", "a.png", True) is not None
    assert read_cached(folder, "", "a.png") is None


MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:25 / /mnt/auto rw,relatime shared:9 - nfs4 nas.example:/ rw,vers=4.0
31 30 0:26 / /mnt/auto/local\\040disk rw shared:10 - xfs /dev/vdb rw
40 22 0:30 / /tmp rw,nosuid - tmpfs tmpfs rw
"""


def test_a_paths_filesystem_is_the_deepest_mount_holding_it():
    assert filesystem_type("/work/x", MOUNTINFO) == "ext4"
    assert filesystem_type("/mnt/auto/comfyui/output", MOUNTINFO) == "nfs4"
    assert filesystem_type("/mnt/auto/local disk/output", MOUNTINFO) == "xfs"
    assert filesystem_type("/mnt/autoz", MOUNTINFO) == "ext4"
    assert filesystem_type("/tmp", MOUNTINFO) == "tmpfs"
    assert filesystem_type("/x", "") is None


# -- inputs written into ComfyUI's folder ------------------------------------------------------------------


def test_the_client_writes_an_input_into_the_folder_without_uploading(tmp_path):
    folder = tmp_path / "input"
    name = client_call(Folders(input=folder), lambda comfy: comfy.upload_input(b"\x89PNG data", "abc123.png"))
    assert name == "abc123.png"
    assert (folder / "abc123.png").read_bytes() == b"\x89PNG data"
    assert os.listdir(folder) == ["abc123.png"], "no partial file is left behind"


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_input_staged_in_a_subfolder_is_written_whole_there_and_never_through_a_symlink(tmp_path):
    folder = tmp_path / "input"
    name = client_call(Folders(input=folder), lambda comfy: comfy.upload_input(b"\x89PNG one", "serverless/a1.png"))
    assert name == "serverless/a1.png"
    assert (folder / "serverless" / "a1.png").read_bytes() == b"\x89PNG one"
    client_call(Folders(input=folder), lambda comfy: comfy.upload_input(b"\x89PNG two", "serverless/a1.png"))
    assert (folder / "serverless" / "a1.png").read_bytes() == b"\x89PNG two"  # replaced whole
    assert sorted(p.name for p in (folder / "serverless").iterdir()) == ["a1.png"]  # no partial file left
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (folder / "out").symlink_to(outside)
    with pytest.raises(InputError):  # not written there; the upload it falls back to finds nobody
        client_call(Folders(input=folder), lambda comfy: comfy.upload_input(b"\x89PNG", "out/a2.png"))
    assert list(outside.iterdir()) == []


def test_a_base64_input_written_to_disk_is_what_comfyui_loads(own_emulator, start_app):
    # the input folder beside the output folder named
    server = start_app(own_emulator.url, COMFYUI_OUTPUT_DIR=str(own_emulator.root / "output"), LOG_LEVEL="DEBUG")
    data = png((10, 200, 30))
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": base64.b64encode(data).decode()}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "disk/in"}},
    }
    response = post_run(server.url, workflow, params=B64)
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]["results"]
    loaded = Image.open(io.BytesIO(base64.b64decode(result["output"]["base64"]["content"])))
    assert loaded.convert("RGB").getpixel((0, 0)) == (10, 200, 30)
    written = [p for p in (own_emulator.root / "input").rglob("*") if p.is_file() and p.read_bytes() == data]
    assert len(written) == 1 and written[0].name.startswith(hashlib.sha256(data).hexdigest()[:8])
    assert "written into ComfyUI's input folder" in server.log_text()


# -- where ComfyUI's folders are ---------------------------------------------------------------------------


def test_by_default_outputs_and_inputs_go_through_comfyuis_http_api():
    assert comfyui_folders(Settings.from_env({}), None) == Folders()
    # COMFYUI_DIR without a ComfyUI we start (nothing to run there): still the HTTP API.
    assert comfyui_folders(Settings.from_env({"COMFYUI_DIR": "/nowhere"}), None) == Folders()


def test_the_folders_of_the_comfyui_we_start_are_derived_from_its_command():
    command = [
        "python",
        "/app/ComfyUI/main.py",
        "--listen",
        "127.0.0.1",
        "--output-directory",
        "/mnt/auto/output",
        "--input-directory",
        "/mnt/auto/input",
    ]
    assert started_folders(command, "/app/ComfyUI") == Folders(
        output=Path("/mnt/auto/output"), temp=Path("/app/ComfyUI/temp"), input=Path("/mnt/auto/input")
    )
    assert started_folders(["python", "main.py", "--temp-directory", "/t"], "/c") == Folders(
        output=Path("/c/output"), temp=Path("/t/temp"), input=Path("/c/input")
    )
    assert started_folders(["python", "-m", "serverless.emulator"], "/c") == Folders()
    settings = Settings.from_env({"COMFYUI_DIR": "/c", "COMFYUI_CMD": "python main.py", "COMFYUI_OUTPUT_DIR": "/o"})
    assert comfyui_folders(settings, ["python", "main.py"]) == Folders(
        output=Path("/o"), temp=Path("/c/temp"), input=Path("/c/input")
    )


# -- status broadcasts: to the callers that get ComfyUI's messages, not to every job ---------------


def test_status_broadcasts_reach_every_watched_job_but_not_the_log_of_a_sync_job_nobody_named(own_emulator, start_app):
    # ComfyUI sends `status` to every client on each queue change: with N jobs waiting that is
    # ~3N broadcasts per job. A stream forwards them, and a named task's log holds them (the
    # contract: the same payloads as the stream); the log of a sync job nobody named (seen only
    # in its answer) leaves them out. Each learns its place in the queue by asking ComfyUI.
    set_step_delay(own_emulator, 0.05)
    server = start_app(own_emulator.url)
    first = in_background(lambda: run_stream(server.url, txt2img(seed=700, steps=20, prefix="head")))
    wait_until(lambda: prompt_ids(own_emulator.url, "head", "running"))
    named_id = f"sync-named-{os.getpid()}"
    named = in_background(
        lambda: post_run(server.url, txt2img(seed=701, steps=2, prefix="named"), headers={"x-fc-trace-id": named_id})
    )
    wait_until(lambda: prompt_ids(own_emulator.url, "named", "pending"))
    unnamed = in_background(lambda: post_run(server.url, txt2img(seed=702, steps=2, prefix="unnamed")))
    wait_until(lambda: prompt_ids(own_emulator.url, "unnamed", "pending"))
    streamed = first.result(timeout=60)
    assert named.result(timeout=60).json()["type"] == "serverless_api"
    answer = unnamed.result(timeout=60).json()
    assert answer["type"] == "serverless_api"

    head_id = json.loads(streamed[-1])["data"]["prompt_id"]
    forwarded = comfyui_texts(streamed[:-1])
    assert_forwarded_as_sent(forwarded, sent_to(own_emulator.url, head_id), head_id)
    assert sum(json.loads(t)["type"] == "status" for t in forwarded) >= 2  # the queue grew and shrank

    def places(log: list[dict[str, Any]]) -> list[int]:
        return [p["data"]["queue_position"] for p in log if p["type"] == "serverless_progress"]

    named_log = status_log(server, named_id)
    assert named_log[-1]["type"] == "serverless_api"
    assert [p for p in named_log if p["type"] == "status"]
    seen = [place for place in places(named_log) if place is not None]
    # first in line, then running (a loaded machine may report a place twice: never a new one)
    assert [place for n, place in enumerate(seen) if n == 0 or seen[n - 1] != place] == [1, 0]

    task_id = answer["data"]["task_id"]  # its log is written after the answer
    unnamed_log = wait_until(
        lambda: (log := status_log(server, task_id)) and log[-1]["type"] == "serverless_api" and log
    )
    assert not [p for p in unnamed_log if p["type"] == "status"]
    seen = [place for place in places(unnamed_log) if place is not None]
    assert seen[0] == 2 and seen[-1] == 0  # second in line, then running


async def test_a_job_that_fails_taking_a_message_fails_alone_and_the_socket_serves_on(emulator):
    # A job's messages are handed to it in the listener's task: what its `take` raises there is
    # raised in the job's own (`follow`), not in the instance's only socket.
    async with ComfyUI.open(emulator.url, Timeouts(connect=5, request=10)) as comfy:

        def failing(message: Message | PreviewFrame) -> None:
            if isinstance(message, Message) and message.type == "executed":
                raise RuntimeError("a bug in the job")

        async with comfy.connect("take-fails") as connection:
            await comfy.submit(empty_image(prefix="take-fails"), connection.client_id, "take-fails", None)
            with pytest.raises(RuntimeError, match="a bug in the job"):
                await connection.follow("take-fails", failing)
        taken: list[Message | PreviewFrame] = []
        async with comfy.connect("next-job") as connection:
            await comfy.submit(empty_image(prefix="next-job"), connection.client_id, "next-job", None)
            await connection.follow("next-job", taken.append)
    kinds = [m.type for m in taken if isinstance(m, Message) and m.prompt_id == "next-job"]
    assert kinds[0] == "execution_start" and "executed" in kinds and kinds[-1] == "executing"
    assert connection.complete


async def test_a_broadcast_after_the_prompt_ended_is_no_part_of_its_job(emulator):
    # A queue change after a prompt's end (another job's prompt arriving) while its job still
    # winds down (reading outputs) belongs to no job of ours: it is not forwarded. Deterministic:
    # the connection stays open until the listener has received that broadcast.
    forwarded: list[str] = []
    async with ComfyUI.open(emulator.url, Timeouts(connect=5, request=10)) as comfy:
        prompt_id = "trailing-broadcast"
        async with comfy.connect(prompt_id, lambda message: forwarded.append(message.text)) as connection:
            await comfy.submit(empty_image(prefix="trailing"), connection.client_id, prompt_id, None)

            def take(message: Message | PreviewFrame) -> None:
                if isinstance(message, Message) and message.type == "status":
                    forwarded.append(message.text)  # as the job publishes its inbox's broadcasts

            await connection.follow(prompt_id, take)
            before = comfy.listener.latest_status
            await comfy.submit(empty_image(prefix="trailing-next"), "someone-else", "trailing-next", None)
            await asyncio.to_thread(wait_until, lambda: comfy.listener.latest_status is not before)
            trailing = comfy.listener.latest_status
    assert forwarded, "the broadcasts while the prompt ran were forwarded"
    assert trailing is not None and trailing.type == "status"
    assert all(text is not trailing.text for text in forwarded), (
        "a broadcast after the end was forwarded"
    )  # the same object
