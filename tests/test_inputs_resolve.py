"""Loader inputs: classification (pure) and `resolve_inputs` fetching from a real local HTTP server
through the real guarded downloader, uploading through a recording `upload` callable."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import io
import os
import struct
import threading
import wave
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from serverless.errors import ComfyUIUnavailable, InputError, InvalidParams
from serverless.inputs.download import DownloadPolicy, create_download_session, download
from serverless.inputs.resolve import (
    CLASSIFY_PREFIX,
    INLINE_BYTES,
    INPUT_SUBFOLDER,
    LOADER_INPUTS,
    InputLimits,
    LoaderInput,
    classify,
    find_loader_inputs,
    resolve_inputs,
)


def png_bytes(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(160))
    return buf.getvalue()


def mp4_bytes() -> bytes:
    body = b"isom\x00\x00\x02\x00isomiso2avc1mp41"
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00\x00\x00\x08free"


def webm_bytes() -> bytes:
    return b"\x1a\x45\xdf\xa3\x87\x42\x82\x84webm\x18\x53\x80\x67\xc0" + bytes(64)  # Segment of 64 bytes


PNG = png_bytes()
PNG_BLUE = png_bytes("blue")
WAV = wav_bytes()
MP4 = mp4_bytes()
HTML = b"<!doctype html><title>Sign in</title>"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def name_of(data: bytes, ext: str, subfolder: str = INPUT_SUBFOLDER) -> str:
    """The name an input gets in ComfyUI's input folder: under a subfolder for the built-in
    loaders (ComfyUI's listing of the folder's top level stays short), at the top otherwise."""
    name = f"{hashlib.sha256(data).hexdigest()[:32]}.{ext}"
    return f"{subfolder}/{name}" if subfolder else name


# --- a real file server and a recording ComfyUI upload --------------------------------------


@dataclass
class Files:
    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    arrived: int = 0
    both_arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


BODIES = {
    "/cat.png": PNG,
    "/blue.png": PNG_BLUE,
    "/voice.wav": WAV,
    "/clip.mp4": MP4,
    "/login.html": HTML,
    "/mesh.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n",
}


@pytest.fixture
async def files() -> AsyncIterator[Files]:
    state = Files()

    async def body(request: web.Request) -> web.Response:
        state.hits[request.path] += 1
        if request.path not in BODIES:
            return web.Response(status=404)
        return web.Response(body=BODIES[request.path])

    async def rendezvous(request: web.Request) -> web.Response:
        # Answers only once two requests are in flight together: proves concurrent fetching.
        state.hits[request.path] += 1
        state.arrived += 1
        if state.arrived == 2:
            state.both_arrived.set()
        try:
            await asyncio.wait_for(state.both_arrived.wait(), 5)
        except TimeoutError:
            return web.Response(status=409)
        return web.Response(body=png_bytes(request.match_info["color"]))

    app = web.Application()
    app.router.add_get("/together/{color}.png", rendezvous)
    app.router.add_get("/{tail:.*}", body)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


@dataclass
class Uploads:
    """Stands in for ComfyUI's `/upload/image`: records calls, returns the name it was given."""

    calls: list[tuple[bytes, str]] = field(default_factory=list)
    fail_with: Exception | None = None

    async def __call__(self, data: bytes, filename: str) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        self.calls.append((data, filename))
        return filename


LOOPBACK_ALLOWED = DownloadPolicy(allowed_hosts=frozenset({"127.0.0.1"}))
Resolve = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
async def resolve() -> AsyncIterator[Resolve]:
    """`resolve(workflow, policy=..., **overrides)` with the real downloader."""
    sessions = []

    async def run(
        workflow: dict[str, Any],
        policy: DownloadPolicy = LOOPBACK_ALLOWED,
        **overrides: Any,
    ) -> dict[str, Any]:
        session = create_download_session(policy)
        sessions.append(session)
        kwargs: dict[str, Any] = {
            "loaders": LOADER_INPUTS,
            "fetch_url": partial(download, session, policy=policy),
            "read_oss": None,
            "upload": Uploads(),
            "limits": InputLimits(max_base64_bytes=1024 * 1024),
            **overrides,
        }
        return await resolve_inputs(workflow, **kwargs)

    yield run
    for session in sessions:
        await session.close()


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}


# --- pure part --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("example.png", "file"),
        ("sub/example.png", "file"),
        ("example.png [input]", "file"),
        ("a" * 64, "file"),
        ("clip_" + "x" * 80 + ".mp4", "file"),
        ("http://example.com/cat.png", "url"),
        ("HTTPS://example.com/cat.png?sig=1", "url"),
        ("oss://bucket.oss-cn-hangzhou.aliyuncs.com/in/cat.png", "oss"),
        ("oss://bucket/in/cat.png", "oss"),
        ("s3://bucket/in/cat.png", "s3"),
        ("S3://bucket/in/cat.png", "s3"),
        ("data:image/png;base64,iVBORw0KGgo=", "base64"),
        (b64(PNG), "base64"),
        (base64.encodebytes(PNG).decode(), "base64"),
        ("a" * 65, "base64"),
    ],
)
def test_classify(value: str, kind: str) -> None:
    assert classify(value) == kind


def test_a_value_longer_than_any_path_is_told_by_its_start() -> None:
    assert classify("A" * 100 + ".png") == "file"
    assert classify("A" * CLASSIFY_PREFIX + ".png") == "base64"  # the decoder refuses its end
    assert classify("cat.png" + "A" * CLASSIFY_PREFIX) == "file"


@pytest.mark.parametrize(
    "value",
    ["/etc/passwd", "\\\\server\\share\\x.png", "C:\\Windows\\x.png", "c:/x.png",
     "../secret.png", "sub/../../x.png", "sub\\..\\x.png", "..", "x\x00.png"],
)  # fmt: skip
def test_classify_refuses_unsafe_file_names(value: str) -> None:
    with pytest.raises(InvalidParams):
        classify(value)


@pytest.mark.parametrize("value", ["ftp://host/x.png", "file:///etc/passwd", "gs://b/k.png"])
def test_classify_refuses_other_url_schemes(value: str) -> None:
    with pytest.raises(InputError, match="unsupported URL scheme"):
        classify(value)


def test_find_loader_inputs_lists_string_values_of_loader_inputs_in_order() -> None:
    workflow = {
        "1": node("LoadImage", image="a.png", upload="image"),
        "2": node("KSampler", seed=1, image="not-a-loader.png"),
        "3": node("LoadImageMask", image=["1", 0], channel="alpha"),
        "4": node("LoadAudio", audio="v.wav"),
        "5": node("VHS_LoadVideo", video="c.mp4"),
        "6": node("LoadVideo", file="d.mp4"),
        "7": "not a node",
        "8": {"class_type": "LoadImage"},
        "9": node("Load3D", model_file="m.glb"),
    }
    assert find_loader_inputs(workflow, LOADER_INPUTS) == [
        LoaderInput("1", "image", "a.png"),
        LoaderInput("4", "audio", "v.wav"),
        LoaderInput("5", "video", "c.mp4"),
        LoaderInput("6", "file", "d.mp4"),
    ]
    custom = find_loader_inputs(workflow, {("Load3D", "model_file")})
    assert custom == [("9", "model_file", "m.glb")]


# --- resolve_inputs ---------------------------------------------------------------------------


async def test_every_loader_class_gets_its_input_uploaded_and_replaced(files: Files, resolve: Resolve) -> None:
    workflow = {
        "10": node("LoadImage", image=files.url("/cat.png"), upload="image"),
        "11": node("LoadImageMask", image=b64(PNG_BLUE), channel="alpha"),
        "12": node("LoadAudio", audio="data:audio/wav;base64," + b64(WAV)),
        "13": node("VHS_LoadVideo", video=files.url("/clip.mp4"), force_rate=0),
        "14": node("LoadVideo", file=b64(webm_bytes())),
        "15": node("LoadImage", image="already_there.png"),
        "16": node("LoadImageMask", image=["15", 0]),
        "17": node("SaveImage", images=["10", 0], filename_prefix="ComfyUI"),
    }
    original = copy.deepcopy(workflow)
    uploads = Uploads()

    result = await resolve(workflow, upload=uploads)

    assert workflow == original, "the caller's workflow must not change"
    expected = {
        ("10", "image"): name_of(PNG, "png"),
        ("11", "image"): name_of(PNG_BLUE, "png"),
        ("12", "audio"): name_of(WAV, "wav"),
        ("13", "video"): name_of(MP4, "mp4"),
        ("14", "file"): name_of(webm_bytes(), "webm"),
    }
    for (node_id, input_name), name in expected.items():
        assert result[node_id]["inputs"][input_name] == name
    assert sorted(name for _, name in uploads.calls) == sorted(expected.values())
    assert dict(uploads.calls)[PNG] == name_of(PNG, "png")
    for node_id in ("15", "16", "17"):
        assert result[node_id] == original[node_id]
    assert result["10"]["inputs"]["upload"] == "image"
    assert result["13"]["_meta"] == original["13"]["_meta"]


async def test_workflow_without_remote_inputs_comes_back_as_an_equal_copy(
    resolve: Resolve,
) -> None:
    workflow = {"1": node("LoadImage", image="a.png")}
    uploads = Uploads()
    result = await resolve(workflow, upload=uploads)
    assert result == workflow and result is not workflow
    assert result["1"]["inputs"] is not workflow["1"]["inputs"]
    assert not uploads.calls


async def test_same_bytes_are_fetched_once_and_uploaded_once(files: Files, resolve: Resolve) -> None:
    url = files.url("/cat.png")
    workflow = {
        "1": node("LoadImage", image=url),
        "2": node("LoadImage", image=url),
        "3": node("LoadImageMask", image=b64(PNG)),
        "4": node("LoadImageMask", image="data:image/png;base64," + b64(PNG)),
    }
    uploads = Uploads()
    result = await resolve(workflow, upload=uploads)
    assert files.hits["/cat.png"] == 1
    assert uploads.calls == [(PNG, name_of(PNG, "png"))]
    assert {n["inputs"]["image"] for n in result.values()} == {name_of(PNG, "png")}


async def test_inputs_are_fetched_concurrently(files: Files, resolve: Resolve) -> None:
    workflow = {
        "1": node("LoadImage", image=files.url("/together/red.png")),
        "2": node("LoadImage", image=files.url("/together/blue.png")),
    }
    result = await resolve(workflow)
    assert result["1"]["inputs"]["image"] == name_of(png_bytes("red"), "png")
    assert result["2"]["inputs"]["image"] == name_of(png_bytes("blue"), "png")


async def test_a_failed_download_names_node_and_input_and_nothing_is_uploaded(files: Files, resolve: Resolve) -> None:
    workflow = {
        "5": node("LoadImage", image=files.url("/cat.png")),
        "6": node("LoadImage", image=b64(PNG_BLUE)),
        "12": node("LoadAudio", audio=files.url("/gone.wav?Signature=s3cr3t")),
    }
    uploads = Uploads()
    with pytest.raises(InputError) as info:
        await resolve(workflow, upload=uploads)
    err = info.value
    assert err.message == "node 12 (LoadAudio) input 'audio': cannot download: HTTP 404"
    assert err.raw == {
        "node_id": "12",
        "class_type": "LoadAudio",
        "input_name": "audio",
        "reason": "cannot download: HTTP 404",
    }
    assert err.to_payload()["error_code"] == "INPUT_ERROR"
    assert "s3cr3t" not in err.message
    assert not uploads.calls


async def test_a_blocked_address_fails_the_input_by_default(files: Files, resolve: Resolve) -> None:
    workflow = {"3": node("LoadImage", image=files.url("/cat.png"))}
    with pytest.raises(InputError) as info:
        await resolve(workflow, DownloadPolicy())
    assert info.value.message == ("node 3 (LoadImage) input 'image': cannot download: blocked address 127.0.0.1")
    assert not files.hits


async def test_metadata_url_fails_the_input(resolve: Resolve) -> None:
    workflow = {"3": node("LoadImage", image="http://100.100.100.200/latest/meta-data/")}
    with pytest.raises(InputError, match=r"node 3 .*'image'.*blocked address 100\.100\.100\.200"):
        await resolve(workflow, DownloadPolicy())


async def test_broken_base64_names_node_and_input(resolve: Resolve) -> None:
    workflow = {"7": node("LoadImageMask", image="data:image/png;base64,iVBORw0KGgo*AAAA")}
    with pytest.raises(InputError) as info:
        await resolve(workflow)
    assert info.value.message.startswith("node 7 (LoadImageMask) input 'image': cannot decode: invalid base64")


async def test_oversize_base64_is_refused(resolve: Resolve) -> None:
    workflow = {"7": node("LoadImage", image=b64(PNG))}
    with pytest.raises(InputError, match=r"node 7 .*larger than 16 bytes"):
        await resolve(workflow, limits=InputLimits(max_base64_bytes=16))


def noise_png(side: int = 160) -> bytes:
    """A PNG of random pixels: past INLINE_BYTES (decoded and checked in a worker thread)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG")
    return buf.getvalue()


async def test_a_big_base64_input_is_decoded_checked_and_uploaded(resolve: Resolve) -> None:
    big = noise_png()
    assert len(b64(big)) > INLINE_BYTES
    uploads = Uploads()
    workflow = {
        "7": node("LoadImage", image=b64(big)),
        "8": node("LoadImageMask", image=f"data:image/png;base64,{b64(big)}"),
    }
    result = await resolve(workflow, upload=uploads)
    assert result["7"]["inputs"]["image"] == result["8"]["inputs"]["image"] == name_of(big, "png")
    assert uploads.calls == [(big, name_of(big, "png"))]


async def test_a_big_truncated_image_is_refused_before_upload(resolve: Resolve) -> None:
    cut = noise_png()[:-5000]
    uploads = Uploads()
    with pytest.raises(InputError) as info:
        await resolve({"7": node("LoadImage", image=b64(cut))}, upload=uploads)
    assert info.value.message.startswith("node 7 (LoadImage) input 'image': image/png content is not usable")
    assert not uploads.calls


async def test_a_big_input_past_the_request_total_is_refused_for_its_size_first(resolve: Resolve) -> None:
    cut = noise_png()[:-5000]  # broken too: the total is what the caller is told first
    limits = InputLimits(max_base64_bytes=1024 * 1024, max_job_bytes=len(cut) - 1)
    with pytest.raises(InputError, match=rf"node 7 .*add up to more than {len(cut) - 1} bytes"):
        await resolve({"7": node("LoadImage", image=b64(cut))}, limits=limits)


@dataclass
class WrittenHere:
    """Stands in for the write into ComfyUI's input folder on our disk: records the calls and the
    thread each ran in; None (could not write) when told to."""

    calls: list[tuple[bytes, str]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    fails: bool = False

    def __call__(self, data: bytes, filename: str) -> str | None:
        self.threads.append(threading.get_ident())
        if self.fails:
            return None
        self.calls.append((data, filename))
        return filename


async def test_a_lone_big_base64_input_is_written_here_in_the_thread_that_decoded_it(resolve: Resolve) -> None:
    big = noise_png()
    written, uploads = WrittenHere(), Uploads()
    workflow = {
        "7": node("LoadImage", image=b64(big)),
        "8": node("LoadImageMask", image=b64(big)),  # the same value twice: still one input
    }
    result = await resolve(workflow, upload=uploads, write_here=written)
    assert result["7"]["inputs"]["image"] == result["8"]["inputs"]["image"] == name_of(big, "png")
    assert written.calls == [(big, name_of(big, "png"))]
    assert written.threads != [threading.get_ident()]  # a worker thread, not the event loop
    assert not uploads.calls


async def test_an_input_not_written_here_is_uploaded(resolve: Resolve) -> None:
    big = noise_png()
    written, uploads = WrittenHere(fails=True), Uploads()
    result = await resolve({"7": node("LoadImage", image=b64(big))}, upload=uploads, write_here=written)
    assert result["7"]["inputs"]["image"] == name_of(big, "png")
    assert uploads.calls == [(big, name_of(big, "png"))]


async def test_an_input_refused_is_never_written_here(resolve: Resolve) -> None:
    written = WrittenHere()
    with pytest.raises(InputError, match=r"node 7 .*not usable"):
        await resolve({"7": node("LoadImage", image=b64(noise_png()[:-5000]))}, write_here=written)
    with pytest.raises(InputError, match=r"node 8 \(LoadAudio\) input 'audio': expected audio, got image/png"):
        big = b64(noise_png())
        await resolve({"7": node("LoadImage", image=big), "8": node("LoadAudio", audio=big)}, write_here=written)
    big = noise_png()
    limits = InputLimits(max_base64_bytes=1024 * 1024, max_job_bytes=len(big) - 1)
    with pytest.raises(InputError, match=r"node 7 .*add up to more than"):
        await resolve({"7": node("LoadImage", image=b64(big))}, limits=limits, write_here=written)
    assert not written.calls


async def test_several_inputs_are_uploaded_once_all_are_checked(resolve: Resolve) -> None:
    first, second = noise_png(), noise_png()
    written, uploads = WrittenHere(), Uploads()
    workflow = {"7": node("LoadImage", image=b64(first)), "8": node("LoadImage", image=b64(second))}
    await resolve(workflow, upload=uploads, write_here=written)
    assert not written.calls
    assert sorted(uploads.calls) == sorted([(first, name_of(first, "png")), (second, name_of(second, "png"))])


async def test_a_long_value_is_a_file_name_only_when_its_start_is_not_base64(resolve: Resolve) -> None:
    name = "sub/cat.png" + "x" * INLINE_BYTES
    uploads = Uploads()
    assert (await resolve({"7": node("LoadImage", image=name)}, upload=uploads))["7"]["inputs"]["image"] == name
    assert not uploads.calls
    with pytest.raises(InvalidParams, match=r"node 7 \(LoadImage\) input 'image': '\.\.' is not allowed"):
        await resolve({"7": node("LoadImage", image="../" + "x" * INLINE_BYTES + ".png")})
    # Longer than any path and base64 as far as it is looked at: the decoder checks the rest.
    spoilt = b64(noise_png()) + "!"
    assert len(spoilt) > CLASSIFY_PREFIX
    with pytest.raises(InputError) as info:
        await resolve({"7": node("LoadImage", image=spoilt)}, upload=uploads)
    assert info.value.message.startswith("node 7 (LoadImage) input 'image': cannot decode: invalid base64")
    assert not uploads.calls


@pytest.mark.parametrize(
    ("class_type", "input_name", "path", "reason"),
    [
        ("LoadImage", "image", "/login.html", "expected an image, got content of an unrecognised type"),
        ("LoadImage", "image", "/voice.wav", "expected an image, got audio/wav"),
        ("LoadImageMask", "image", "/clip.mp4", "expected an image, got video/mp4"),
        ("LoadAudio", "audio", "/cat.png", "expected audio, got image/png"),
        ("VHS_LoadVideo", "video", "/voice.wav", "expected a video, got audio/wav"),
        ("LoadVideo", "file", "/login.html", "expected a video, got content of an unrecognised type"),
    ],
)  # fmt: skip
async def test_content_a_loader_cannot_read_is_refused_before_upload(
    files: Files,
    resolve: Resolve,
    class_type: str,
    input_name: str,
    path: str,
    reason: str,
) -> None:
    workflow = {"4": node(class_type, **{input_name: files.url(path)})}
    uploads = Uploads()
    with pytest.raises(InputError) as info:
        await resolve(workflow, upload=uploads)
    assert info.value.message == f"node 4 ({class_type}) input '{input_name}': {reason}"
    assert not uploads.calls


async def test_audio_loader_accepts_a_video_container(files: Files, resolve: Resolve) -> None:
    workflow = {"4": node("LoadAudio", audio=files.url("/clip.mp4"))}
    result = await resolve(workflow)
    assert result["4"]["inputs"]["audio"] == name_of(MP4, "mp4")


async def test_configured_loaders_accept_any_content_with_a_safe_extension(files: Files, resolve: Resolve) -> None:
    obj = BODIES["/mesh.obj"]
    workflow = {
        "1": node("Load3D", model_file=files.url("/mesh.obj?v=2")),
        "2": node("Load3D", model_file=b64(b"\x00\x01 some unknown binary format " * 4)),
        "3": node("LoadText", path="data:text/plain;base64," + b64(b"hello world")),
    }
    loaders = {("Load3D", "model_file"), ("LoadText", "path")}
    result = await resolve(workflow, loaders=loaders)
    assert result["1"]["inputs"]["model_file"] == name_of(obj, "obj", subfolder="")
    assert result["2"]["inputs"]["model_file"].endswith(".bin")
    assert result["3"]["inputs"]["path"] == name_of(b"hello world", "txt", subfolder="")


@pytest.mark.parametrize("value", ["/etc/passwd", "../../models/secret.safetensors"])
async def test_unsafe_file_names_are_invalid_params_naming_node_and_input(
    files: Files, resolve: Resolve, value: str
) -> None:
    workflow = {
        "1": node("LoadImage", image=files.url("/cat.png")),
        "2": node("LoadImage", image=value),
    }
    with pytest.raises(InvalidParams) as info:
        await resolve(workflow)
    assert info.value.message.startswith("node 2 (LoadImage) input 'image': ")
    assert info.value.to_payload()["error_code"] == "INVALID_PARAMS"
    assert not files.hits, "nothing is fetched when a name is refused"


async def test_oss_inputs_need_oss_configured(resolve: Resolve) -> None:
    workflow = {"8": node("LoadImage", image="oss://bucket/in/cat.png")}
    with pytest.raises(InputError, match=r"node 8 .*OSS to be configured"):
        await resolve(workflow, read_oss=None)


async def test_oss_inputs_are_read_with_read_oss(resolve: Resolve) -> None:
    seen: list[str] = []

    async def read_oss(url: str) -> bytes:
        seen.append(url)
        return PNG

    workflow = {"8": node("LoadImage", image="oss://bucket.oss-cn-hangzhou.aliyuncs.com/in/cat.png")}
    result = await resolve(workflow, read_oss=read_oss)
    assert seen == ["oss://bucket.oss-cn-hangzhou.aliyuncs.com/in/cat.png"]
    assert result["8"]["inputs"]["image"] == name_of(PNG, "png")


async def test_s3_inputs_need_s3_storage(resolve: Resolve) -> None:
    async def read_oss(url: str) -> bytes:
        raise AssertionError("an s3:// input is never read from OSS")

    workflow = {"8": node("LoadImage", image="s3://bucket/in/cat.png")}
    with pytest.raises(InputError, match=r"node 8 .*s3:// inputs need S3 \(STORAGE=s3"):
        await resolve(workflow, read_oss=read_oss)


async def test_s3_inputs_are_read_with_read_s3(resolve: Resolve) -> None:
    seen: list[str] = []

    async def read_s3(url: str) -> bytes:
        seen.append(url)
        return PNG

    workflow = {"8": node("LoadImage", image="s3://bucket/in/cat.png")}
    result = await resolve(workflow, read_oss=None, read_s3=read_s3)
    assert seen == ["s3://bucket/in/cat.png"]
    assert result["8"]["inputs"]["image"] == name_of(PNG, "png")


async def test_oss_read_failure_names_node_and_input(resolve: Resolve) -> None:
    async def read_oss(url: str) -> bytes:
        raise InputError("NoSuchKey")

    workflow = {"8": node("LoadImage", image="oss://bucket/in/missing.png")}
    with pytest.raises(InputError) as info:
        await resolve(workflow, read_oss=read_oss)
    assert info.value.message == "node 8 (LoadImage) input 'image': cannot read from OSS: NoSuchKey"


async def test_upload_failure_is_an_input_error(files: Files, resolve: Resolve) -> None:
    workflow = {"9": node("LoadImage", image=files.url("/cat.png"))}
    uploads = Uploads(fail_with=InputError("ComfyUI answered 413"))
    with pytest.raises(InputError) as info:
        await resolve(workflow, upload=uploads)
    assert info.value.message == ("node 9 (LoadImage) input 'image': cannot upload to ComfyUI: ComfyUI answered 413")


async def test_comfyui_down_during_upload_stays_unavailable(files: Files, resolve: Resolve) -> None:
    workflow = {"9": node("LoadImage", image=files.url("/cat.png"))}
    uploads = Uploads(fail_with=ComfyUIUnavailable("connection refused"))
    with pytest.raises(ComfyUIUnavailable):
        await resolve(workflow, upload=uploads)
