"""serverless.delivery.oss against a local OSS server that checks V4 signatures (tests/oss_server.py), plus
one opt-in round trip against a real bucket."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import time
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import oss2
import pytest
import requests

from serverless.core.credentials import Credentials
from serverless.delivery.oss import OssConfig, OssStore, ReadRule, parse_oss_url, read_rules
from serverless.errors import InputError, OutputError
from tests.oss_server import LocalOss, canonical_request, signature, string_to_sign

KEY_ID, SECRET = "LTAI-test-key", "secret-value-never-shown"
STS_ID, STS_SECRET, STS_TOKEN = "STS.test-key", "sts-secret-never-shown", "sts-token-never-shown"
REGION = "cn-hangzhou"
WRONG_SECRET = "wrong-secret-never-shown"
GOOD = Credentials(KEY_ID, SECRET)
STS = Credentials(STS_ID, STS_SECRET, STS_TOKEN)
KEY_PATTERN = re.compile(r"serverless-api-output/[0-9a-f-]{36}\.png")


@pytest.fixture
def bucket() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def local_oss(bucket: str) -> Iterator[LocalOss]:
    accounts = {KEY_ID: (SECRET, None), STS_ID: (STS_SECRET, STS_TOKEN)}
    with LocalOss(accounts, [bucket], region=REGION) as server:
        yield server


def config_for(server: LocalOss, bucket: str, expires_in: int = 0) -> OssConfig:
    config = OssConfig.from_values(
        f"{bucket}.oss-{REGION}.aliyuncs.com", server.endpoint, server.endpoint, None, expires_in
    )
    assert config is not None
    return config


@pytest.fixture
def store(local_oss: LocalOss, bucket: str) -> Iterator[OssStore]:
    store = OssStore(config_for(local_oss, bucket), backoff_s=0.01)
    yield store
    store.close()


@pytest.fixture
def signing_store(local_oss: LocalOss, bucket: str) -> Iterator[OssStore]:
    store = OssStore(config_for(local_oss, bucket, expires_in=600), backoff_s=0.01)
    yield store
    store.close()


def rendered(exc: BaseException) -> str:
    """Everything a log line with a traceback would show: the error and its whole cause chain."""
    return "".join(traceback.format_exception(exc))


async def fetch(url: str) -> requests.Response:
    """GET with plain requests, as a user of a signed URL would, off the event loop."""
    return await asyncio.to_thread(requests.get, url, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the local server's verifier ------------------------------------------------------------------

# Test vectors from Alibaba's own V4 signer tests (aliyun/alibabacloud-oss-python-sdk-v2,
# tests/unit/signer/test_v4.py): an implementation independent of oss2, checked by the same code
# the local server runs. PUT /bucket/1234+-/123/1.txt, access key "ak"/"sk", region cn-hangzhou.
_VECTOR_QUERY = [
    ("param1", "value1"),
    ("+param1", "value3"),
    ("|param1", "value4"),
    ("+param2", ""),
    ("|param2", ""),
    ("param2", ""),
]
_VECTOR_HEADERS = {"x-oss-head1": "value", "abc": "value", "zabc": "value", "xyz": "value"}


@pytest.mark.parametrize(
    ("signed_at", "token", "additional", "presigned", "expected"),
    [
        (1702743657, None, (), False, "e21d18daa82167720f9b1047ae7e7f1ce7cb77a31e8203a7d5f4624fa0284afe"),
        (1702784856, "token", (), False, "b94a3f999cf85bcdc00d332fbd3734ba03e48382c36fa4d5af5df817395bd9ea"),
        (1702747512, None, ("abc", "zabc"), False, "4a4183c187c07c8947db7620deb0a6b38d9fbdd34187b6dbaccb316fa251212f"),
        (1702785388, "token", (), True, "3817ac9d206cd6dfc90f1c09c00be45005602e55898f26f5ddb06d7892e1f8b5"),
        (1702783809, None, ("abc", "zabc"), True, "6bd984bfe531afb6db1f7550983a741b103a8c58e5e14f83ea474c2322dfa2b7"),
    ],
)
def test_local_oss_recomputes_alibaba_published_v4_signatures(
    signed_at: int, token: str | None, additional: tuple[str, ...], presigned: bool, expected: str
) -> None:
    date_time = datetime.fromtimestamp(signed_at, UTC).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{date_time[:8]}/cn-hangzhou/oss/aliyun_v4_request"
    query, headers = list(_VECTOR_QUERY), dict(_VECTOR_HEADERS)
    if presigned:
        headers["content-type"] = "application/octet-stream"
        query += [
            ("x-oss-signature-version", "OSS4-HMAC-SHA256"),
            ("x-oss-date", date_time),
            ("x-oss-expires", "599"),
            ("x-oss-credential", f"ak/{scope}"),
        ]
        query += [("x-oss-security-token", token)] if token else []
        query += [("x-oss-additional-headers", ";".join(additional))] if additional else []
    else:
        headers.update(
            {"content-type": "text/plain", "x-oss-content-sha256": "UNSIGNED-PAYLOAD", "x-oss-date": date_time}
        )
        headers.update({"x-oss-security-token": token} if token else {})
    canonical = canonical_request("PUT", "bucket", "1234+-/123/1.txt", query, headers, additional, "UNSIGNED-PAYLOAD")
    to_sign = string_to_sign(date_time, scope, canonical)

    assert signature("sk", date_time[:8], "cn-hangzhou", "oss", to_sign) == expected


# --- upload ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_upload_stores_bytes_and_content_type_under_a_fresh_key(
    store: OssStore, local_oss: LocalOss, bucket: str
) -> None:
    uploaded = await store.upload(GOOD, b"\x89PNG fake image", "png", "image/png")

    assert KEY_PATTERN.fullmatch(uploaded.object)
    assert (uploaded.region, uploaded.bucket, uploaded.url, uploaded.expire) == ("oss-cn-hangzhou", bucket, None, None)
    assert local_oss.get_object(bucket, uploaded.object) == (b"\x89PNG fake image", "image/png")
    assert uploaded.to_payload() == {
        "region": "oss-cn-hangzhou",
        "bucket": bucket,
        "object": uploaded.object,
        "url": None,
        "expire": None,
    }


@pytest.mark.asyncio
async def test_upload_streams_a_file_from_disk(
    store: OssStore, local_oss: LocalOss, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "ComfyUI_00001_.mp4"
    path.write_bytes(data)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("file read into memory"))

    uploaded = await store.upload(GOOD, path, ".mp4", "video/mp4")

    assert uploaded.object.endswith(".mp4")
    assert local_oss.get_object(bucket, uploaded.object) == (data, "video/mp4")


@pytest.mark.asyncio
async def test_upload_of_a_missing_file_is_an_output_error(store: OssStore, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="could not be read"):
        await store.upload(GOOD, tmp_path / "gone.png", "png", "image/png")


@pytest.mark.asyncio
async def test_presigned_url_serves_the_object_until_it_expires(signing_store: OssStore, local_oss: LocalOss) -> None:
    uploaded = await signing_store.upload(GOOD, b"signed bytes", "png", "image/png")

    assert uploaded.url is not None and uploaded.expire is not None
    assert uploaded.url.startswith(f"{local_oss.endpoint}/{uploaded.bucket}/{uploaded.object}?")
    assert "x-oss-signature-version=OSS4-HMAC-SHA256" in uploaded.url
    assert abs(uploaded.expire - (time.time() + 600)) < 60
    assert "x-oss-signature" not in repr(uploaded)
    response = await fetch(uploaded.url)
    assert (response.status_code, response.content) == (200, b"signed bytes")
    assert response.headers["Content-Type"] == "image/png"

    local_oss.time_offset = 601
    expired = await fetch(uploaded.url)
    assert expired.status_code == 403
    assert "<Code>AccessDenied</Code>" in expired.text and "expired" in expired.text


@pytest.mark.asyncio
async def test_presigned_url_with_one_signature_character_changed_is_refused(signing_store: OssStore) -> None:
    uploaded = await signing_store.upload(GOOD, b"signed bytes", "png", "image/png")
    assert uploaded.url is not None
    signature = re.search(r"x-oss-signature=([0-9a-f]{64})", uploaded.url)
    assert signature is not None
    position = signature.start(1) + 10
    flipped = "0" if uploaded.url[position] != "0" else "1"

    response = await fetch(uploaded.url[:position] + flipped + uploaded.url[position + 1 :])

    assert response.status_code == 403
    assert "<Code>SignatureDoesNotMatch</Code>" in response.text


@pytest.mark.asyncio
async def test_presigned_url_signed_with_a_temporary_key_carries_its_token(signing_store: OssStore) -> None:
    uploaded = await signing_store.upload(STS, b"sts bytes", "png", "image/png")
    assert uploaded.url is not None

    assert (await fetch(uploaded.url)).content == b"sts bytes"
    without_token = re.sub(r"&?x-oss-security-token=[^&]*", "", uploaded.url)
    assert (await fetch(without_token)).status_code == 403


@pytest.mark.asyncio
async def test_wrong_secret_fails_the_upload_at_once_and_leaks_nothing(
    store: OssStore, local_oss: LocalOss, bucket: str
) -> None:
    with pytest.raises(OutputError) as caught:
        await store.upload(Credentials(KEY_ID, WRONG_SECRET), b"data", "png", "image/png")

    assert "SignatureDoesNotMatch" in caught.value.message and "403" in caught.value.message
    assert WRONG_SECRET not in rendered(caught.value)
    assert [r.method for r in local_oss.requests] == ["PUT"]  # a 403 is not retried
    assert local_oss.keys(bucket) == []


@pytest.mark.asyncio
async def test_security_token_mismatch_is_refused_without_showing_a_token(
    store: OssStore, local_oss: LocalOss, bucket: str
) -> None:
    other_token = "other-token-never-shown"
    for creds in (Credentials(STS_ID, STS_SECRET, other_token), Credentials(STS_ID, STS_SECRET)):
        with pytest.raises(OutputError, match="InvalidSecurityToken") as caught:
            await store.upload(creds, b"data", "png", "image/png")
        assert other_token not in rendered(caught.value) and STS_SECRET not in rendered(caught.value)
    assert local_oss.keys(bucket) == []
    assert KEY_PATTERN.fullmatch((await store.upload(STS, b"data", "png", "image/png")).object)


@pytest.mark.asyncio
async def test_oss_error_body_echoing_the_token_is_kept_out_of_errors_and_logs(
    store: OssStore, caplog: pytest.LogCaptureFixture
) -> None:
    # With a bad secret OSS answers SignatureDoesNotMatch and echoes the canonical request,
    # whose headers include x-oss-security-token.
    caplog.set_level(logging.DEBUG)
    with pytest.raises(OutputError) as caught:
        await store.upload(Credentials(STS_ID, WRONG_SECRET, STS_TOKEN), b"data", "png", "image/png")

    for secret in (STS_TOKEN, WRONG_SECRET, STS_SECRET):
        assert secret not in rendered(caught.value)
        assert secret not in caplog.text


@pytest.mark.asyncio
async def test_transient_failures_are_retried(
    store: OssStore, local_oss: LocalOss, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    local_oss.fail_next(2, status=503)

    uploaded = await store.upload(STS, b"after retries", "png", "image/png")

    assert [(r.method, r.status) for r in local_oss.requests] == [("PUT", 503), ("PUT", 503), ("PUT", 200)]
    assert local_oss.get_object(bucket, uploaded.object)[0] == b"after retries"
    assert "retrying" in caplog.text
    assert STS_TOKEN not in caplog.text and STS_ID not in caplog.text


@pytest.mark.asyncio
async def test_upload_gives_up_after_its_attempts(store: OssStore, local_oss: LocalOss, bucket: str) -> None:
    local_oss.fail_next(10, status=500)

    with pytest.raises(OutputError, match=r"InternalError \(HTTP 500"):
        await store.upload(GOOD, b"data", "png", "image/png")

    assert [r.status for r in local_oss.requests] == [500, 500, 500]
    assert local_oss.keys(bucket) == []


@pytest.mark.asyncio
async def test_unreachable_endpoint_is_an_output_error(bucket: str) -> None:
    config = OssConfig.from_values(f"{bucket}.oss-{REGION}.aliyuncs.com", f"http://127.0.0.1:{free_port()}")
    assert config is not None
    store = OssStore(config, attempts=2, backoff_s=0.01, timeout_s=5)
    try:
        with pytest.raises(OutputError, match="connection failed"):
            await store.upload(GOOD, b"data", "png", "image/png")
    finally:
        store.close()


# --- credentials ----------------------------------------------------------------------------------

ENV = {
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "env-id",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "env-secret",
    "ALIBABA_CLOUD_SECURITY_TOKEN": "env-token",
}


def test_header_credentials_win_over_environment_as_a_set() -> None:
    headers = {"X-Fc-Access-Key-Id": "hdr-id", "X-Fc-Access-Key-Secret": "hdr-secret"}

    assert Credentials.resolve(headers, ENV) == Credentials("hdr-id", "hdr-secret", None, from_caller=True)
    assert Credentials.resolve({**headers, "x-fc-security-token": "hdr-token"}, ENV) == Credentials(
        "hdr-id", "hdr-secret", "hdr-token", from_caller=True
    )
    assert Credentials.resolve({"x-fc-access-key-id": "hdr-id"}, ENV) == Credentials(
        "env-id", "env-secret", "env-token", from_caller=False
    )
    assert Credentials.resolve({}, {}) is None
    assert Credentials.resolve({}, {"ALIBABA_CLOUD_ACCESS_KEY_ID": "env-id"}) is None


def test_credentials_repr_shows_nothing_secret() -> None:
    text = repr(Credentials("hdr-id", "hdr-secret", "hdr-token"))
    assert "hdr-secret" not in text and "hdr-token" not in text and "hdr-id" not in text


@pytest.mark.asyncio
async def test_upload_uses_header_credentials_over_environment_ones(
    store: OssStore, local_oss: LocalOss, bucket: str
) -> None:
    bad_env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "stale-secret"}
    from_headers = Credentials.resolve(
        {"x-fc-access-key-id": STS_ID, "x-fc-access-key-secret": STS_SECRET, "x-fc-security-token": STS_TOKEN}, bad_env
    )
    from_env = Credentials.resolve({}, bad_env)
    assert from_headers is not None and from_env is not None

    uploaded = await store.upload(from_headers, b"from headers", "png", "image/png")
    assert local_oss.get_object(bucket, uploaded.object)[0] == b"from headers"
    with pytest.raises(OutputError, match="SignatureDoesNotMatch"):
        await store.upload(from_env, b"from env", "png", "image/png")


# --- read -----------------------------------------------------------------------------------------


def test_read_rules_default_to_the_configured_bucket_and_parse_buckets_and_folders() -> None:
    config = OssConfig.from_values("mine.oss-cn-hangzhou.aliyuncs.com")
    assert config is not None
    assert read_rules(None, config) == (ReadRule("mine"),)
    assert read_rules([], config) == ()
    rules = read_rules(["other", "shared-b/in/", "x-y/a/b"], config)
    assert rules == (ReadRule("other"), ReadRule("shared-b", "in"), ReadRule("x-y", "a/b"))
    assert [str(rule) for rule in rules] == ["other", "shared-b/in", "x-y/a/b"]


@pytest.mark.parametrize("entry", ["UPPER", "b", "bucket/../x", "bucket/a//b", "/x"])
def test_a_bad_read_rule_names_the_setting(entry: str) -> None:
    with pytest.raises(ValueError, match="OSS_INPUT_ALLOWED"):
        ReadRule.parse(entry)


@pytest.mark.parametrize(("bucket", "key", "allowed"), [
    ("common", "in/cat.png", True),
    ("common", "in/sub/cat.png", True),
    ("common", "internal/cat.png", False),  # a prefix is a folder, not a string prefix
    ("common", "in", False),
    ("common", "in/../secret.png", False),
    ("common", "in/./cat.png", False),
    ("other", "in/cat.png", False),
])  # fmt: skip
def test_a_folder_rule_allows_only_keys_inside_it(bucket: str, key: str, allowed: bool) -> None:
    assert ReadRule("common", "in").allows(bucket, key) is allowed


@pytest.mark.asyncio
async def test_read_with_instance_credentials_outside_the_allowed_buckets_is_refused_before_any_request(
    local_oss: LocalOss, bucket: str
) -> None:
    store = OssStore(config_for(local_oss, bucket), read_allowed=(ReadRule("elsewhere"),))
    local_oss.put_object(bucket, "in/cat.png", b"cat bytes", "image/png")
    try:
        with pytest.raises(InputError, match=r"OSS_INPUT_ALLOWED: elsewhere\); send your own OSS credentials"):
            await store.read(GOOD, f"oss://{bucket}/in/cat.png", 1024)
        assert local_oss.requests == [], "nothing was asked of OSS"
        caller = Credentials(KEY_ID, SECRET, from_caller=True)
        assert await store.read(caller, f"oss://{bucket}/in/cat.png", 1024) == b"cat bytes"
    finally:
        store.close()


@pytest.mark.asyncio
async def test_read_fetches_oss_urls_with_and_without_endpoint(
    store: OssStore, local_oss: LocalOss, bucket: str
) -> None:
    local_oss.put_object(bucket, "in/cat one.png", b"cat bytes", "image/png")

    assert await store.read(GOOD, f"oss://{bucket}/in/cat one.png", 1024) == b"cat bytes"
    assert await store.read(STS, f"oss://{bucket}.{local_oss.host}/in/cat one.png", 1024) == b"cat bytes"
    # The public endpoint of the configured region goes to the configured endpoint.
    assert await store.read(GOOD, f"oss://{bucket}.oss-{REGION}.aliyuncs.com/in/cat one.png", 9) == b"cat bytes"


def listing(folder: Path) -> list[str]:
    """The names in `folder` (blocking, small)."""
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.asyncio
async def test_download_streams_an_object_to_disk_with_its_digest(
    store: OssStore, local_oss: LocalOss, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    local_oss.put_object(bucket, "models/lora.safetensors", data)
    dest = tmp_path / "models" / "lora.safetensors"

    stored = await store.download(GOOD, f"oss://{bucket}/models/lora.safetensors", dest, len(data))

    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data and listing(dest.parent) == ["lora.safetensors"]
    with pytest.raises(InputError, match="too large"):
        await store.download(GOOD, f"oss://{bucket}/models/lora.safetensors", tmp_path / "small.bin", len(data) - 1)
    assert not (tmp_path / "small.bin").exists() and listing(tmp_path) == ["models"]


@pytest.mark.asyncio
async def test_read_refuses_an_object_over_the_limit(store: OssStore, local_oss: LocalOss, bucket: str) -> None:
    local_oss.put_object(bucket, "in/big.bin", b"x" * 2000)

    with pytest.raises(InputError, match=r"too large \(2000 bytes\): the limit is 1999 bytes"):
        await store.read(GOOD, f"oss://{bucket}/in/big.bin", 1999)
    assert await store.read(GOOD, f"oss://{bucket}/in/big.bin", 2000) == b"x" * 2000


@pytest.mark.asyncio
async def test_read_counts_bytes_when_the_length_is_not_announced(
    store: OssStore, local_oss: LocalOss, bucket: str
) -> None:
    local_oss.put_object(bucket, "in/big.bin", b"x" * 200_000)
    local_oss.chunked = True

    with pytest.raises(InputError, match="too large: the limit is 100000 bytes"):
        await store.read(GOOD, f"oss://{bucket}/in/big.bin", 100_000)
    assert await store.read(GOOD, f"oss://{bucket}/in/big.bin", 200_000) == b"x" * 200_000


@pytest.mark.asyncio
async def test_read_of_a_missing_object_says_not_found(store: OssStore, bucket: str) -> None:
    with pytest.raises(InputError, match=f"oss://{bucket}/in/none.png not found"):
        await store.read(GOOD, f"oss://{bucket}/in/none.png", 1024)


@pytest.mark.asyncio
async def test_read_with_bad_or_no_credentials_says_access_denied(
    store: OssStore, local_oss: LocalOss, bucket: str
) -> None:
    local_oss.put_object(bucket, "in/cat.png", b"cat bytes")
    for creds in (Credentials(KEY_ID, WRONG_SECRET), None):
        with pytest.raises(InputError, match="access denied") as caught:
            await store.read(creds, f"oss://{bucket}/in/cat.png", 1024)
        assert "never-shown" not in rendered(caught.value)


@pytest.mark.asyncio
async def test_read_is_retried_after_a_transient_failure(store: OssStore, local_oss: LocalOss, bucket: str) -> None:
    local_oss.put_object(bucket, "in/cat.png", b"cat bytes")
    local_oss.fail_next(1)

    assert await store.read(GOOD, f"oss://{bucket}/in/cat.png", 1024) == b"cat bytes"
    assert [r.status for r in local_oss.requests] == [503, 200]


@pytest.mark.asyncio
async def test_read_never_signs_for_a_host_the_caller_chose(store: OssStore, local_oss: LocalOss) -> None:
    for url in ("oss://bkt.evil.example.com/k.png", "oss://bkt.oss-cn-hangzhou.aliyuncs.com.evil.com/k.png"):
        with pytest.raises(InputError, match="not an Alibaba Cloud OSS endpoint"):
            await store.read(GOOD, url, 1024)
    with pytest.raises(InputError, match="invalid OSS URL"):
        await store.read(GOOD, "oss://Bad_Bucket/k.png", 1024)
    assert local_oss.requests == []


def test_parse_oss_url() -> None:
    default = "http://127.0.0.1:9000"
    assert parse_oss_url("oss://b-1.oss-cn-hangzhou.aliyuncs.com/in/cat.png", default) == (
        "b-1",
        "oss-cn-hangzhou.aliyuncs.com",
        "in/cat.png",
    )
    assert parse_oss_url("oss://b-1/in/a b?c#d.png", default) == ("b-1", default, "in/a b?c#d.png")
    assert parse_oss_url("OSS://B-1.OSS-cn-beijing-internal.aliyuncs.com/K.png", None) == (
        "b-1",
        "oss-cn-beijing-internal.aliyuncs.com",
        "K.png",
    )
    for bad in (
        "https://b-1/k",
        "oss://b-1",
        "oss://b-1/",
        "oss://b-1//k",
        "oss://b_1/k",
        "oss://b-1./k",
        "oss://ab/k",
    ):
        with pytest.raises(ValueError):
            parse_oss_url(bad, default)
    with pytest.raises(ValueError, match="none configured"):
        parse_oss_url("oss://b-1/k", None)


# --- configuration --------------------------------------------------------------------------------


def test_config_from_the_bucket_domain() -> None:
    assert OssConfig.from_values(None) is None and OssConfig.from_values("  ") is None
    config = OssConfig.from_values("my-bucket.oss-cn-hangzhou.aliyuncs.com")
    assert config == OssConfig(
        bucket="my-bucket",
        region="oss-cn-hangzhou",
        endpoint="https://oss-cn-hangzhou.aliyuncs.com",
        sign_endpoint="https://oss-cn-hangzhou.aliyuncs.com",
        key_prefix="serverless-api-output",
        expires_in=0,
    )
    assert config.signing_region == "cn-hangzhou"

    internal = OssConfig.from_values(
        "http://bkt.oss-ap-southeast-1-internal.aliyuncs.com/", None, None, "/out/x/", "3600"
    )
    assert internal is not None
    assert (internal.region, internal.endpoint, internal.sign_endpoint, internal.key_prefix, internal.expires_in) == (
        "oss-ap-southeast-1",
        "http://oss-ap-southeast-1-internal.aliyuncs.com",
        "http://oss-ap-southeast-1.aliyuncs.com",
        "out/x",
        3600,
    )

    overridden = OssConfig.from_values(
        "bkt.oss-cn-hangzhou.aliyuncs.com", "http://127.0.0.1:9000", "cdn-free.example.com", "", 0
    )
    assert overridden is not None
    assert (overridden.endpoint, overridden.sign_endpoint, overridden.key_prefix) == (
        "http://127.0.0.1:9000",
        "https://cdn-free.example.com",
        "",
    )


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        (("bucket.example.com",), "OSS_BUCKET_DOMAIN"),
        (("ftp://bkt.oss-cn-hangzhou.aliyuncs.com",), "OSS_BUCKET_DOMAIN"),
        (("bkt.oss-cn-hangzhou.aliyuncs.com", "http://127.0.0.1:9000/path"), "OSS_ENDPOINT"),
        (("bkt.oss-cn-hangzhou.aliyuncs.com", None, "ftp://x"), "OSS_SIGN_ENDPOINT"),
        (("bkt.oss-cn-hangzhou.aliyuncs.com", None, None, "a/../b"), "OSS_KEY_PREFIX"),
        (("bkt.oss-cn-hangzhou.aliyuncs.com", None, None, None, "soon"), "OSS_EXPIRES_IN_SECOND"),
        (("bkt.oss-cn-hangzhou.aliyuncs.com", None, None, None, "-1"), "OSS_EXPIRES_IN_SECOND"),
        (("bkt.oss-cn-hangzhou.aliyuncs.com", None, None, None, 604801), "OSS_EXPIRES_IN_SECOND"),
    ],
)
def test_config_names_the_setting_it_cannot_use(values: tuple[object, ...], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        OssConfig.from_values(*values)  # type: ignore[arg-type]


# --- a real bucket, when credentials for one are given ---------------------------------------------

REAL = ("OSS_TEST_BUCKET_DOMAIN", "ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET")


@pytest.mark.asyncio
@pytest.mark.skipif(
    not all(os.environ.get(name) for name in REAL),
    reason="real OSS round trip: set OSS_TEST_BUCKET_DOMAIN, ALIBABA_CLOUD_ACCESS_KEY_ID and "
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET (optionally ALIBABA_CLOUD_SECURITY_TOKEN) to run it",
)
async def test_round_trip_against_a_real_bucket() -> None:
    config = OssConfig.from_values(
        os.environ["OSS_TEST_BUCKET_DOMAIN"], os.environ.get("OSS_ENDPOINT"), None, "serverless-api-test", 300
    )
    creds = Credentials.resolve({}, os.environ)
    assert config is not None and creds is not None
    store = OssStore(config)
    data = os.urandom(1024)
    uploaded = await store.upload(creds, data, "bin", "application/octet-stream")
    try:
        assert uploaded.url is not None
        assert (await fetch(uploaded.url)).content == data
        assert await store.read(creds, f"oss://{config.bucket}/{uploaded.object}", 4096) == data
        with pytest.raises(InputError, match="too large"):
            await store.read(creds, f"oss://{config.bucket}/{uploaded.object}", 1000)
    finally:
        auth = oss2.ProviderAuthV4(
            oss2.credentials.StaticCredentialsProvider(
                creds.access_key_id, creds.access_key_secret, creds.security_token or ""
            )
        )
        oss2.Bucket(auth, config.endpoint, config.bucket, region=config.signing_region).delete_object(uploaded.object)
        store.close()
