"""serverless.delivery.s3 against a local S3 server that checks SigV4 signatures as S3 does
(tests/s3_server.py): uploads, presigned URLs and their expiry, `s3://` reads and the buckets they
may name, errors that keep secrets out; and the S3 settings. The server is first checked with an
independent signer (boto3), so that a pass here means obstore signs as S3 expects."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from serverless.delivery.s3 import S3Store
from serverless.delivery.s3_config import AwsKeys, S3Config, config_from_settings, parse_s3_url, profile_keys
from serverless.errors import InputError, OutputError
from serverless.settings import Settings, SettingsError
from tests.s3_server import LocalS3
from tests.servers import free_port

KEY_ID, SECRET = "AKIA-test-key-id", "s3-secret-never-shown"
STS_ID, STS_SECRET, STS_TOKEN = "ASIA-test-key-id", "s3-sts-secret-never-shown", "s3-sts-token-never-shown"
WRONG_SECRET = "s3-wrong-secret-never-shown"
SECRETS = (SECRET, STS_SECRET, STS_TOKEN, WRONG_SECRET)
REGION = "eu-west-1"
KEY_PATTERN = re.compile(r"serverless-api-output/[0-9a-f-]{36}\.png")


@pytest.fixture(scope="module")
def buckets() -> tuple[str, str, str]:
    """The output bucket, an extra input bucket, and a bucket the settings never name."""
    tag = uuid.uuid4().hex[:10]
    return f"out-{tag}", f"in-{tag}", f"foreign-{tag}"


@pytest.fixture(scope="module")
def local_s3(buckets: tuple[str, str, str]) -> Iterator[LocalS3]:
    accounts = {KEY_ID: (SECRET, None), STS_ID: (STS_SECRET, STS_TOKEN)}
    with LocalS3(accounts, buckets, region=REGION) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    if "local_s3" in request.fixturenames:
        server: LocalS3 = request.getfixturevalue("local_s3")
        server.requests.clear()
        server.time_offset = 0
    yield


def config_for(
    server: LocalS3, buckets: tuple[str, str, str], expires_in: int = 0, keys: AwsKeys | None = None
) -> S3Config:
    out, extra, _ = buckets
    return S3Config(
        out, REGION, server.endpoint, "path", (extra,), expires_in=expires_in, keys=keys or AwsKeys(KEY_ID, SECRET)
    )


@pytest.fixture
def store(local_s3: LocalS3, buckets: tuple[str, str, str]) -> Iterator[S3Store]:
    store = S3Store(config_for(local_s3, buckets), backoff_s=0.01)
    yield store
    store.close()


@pytest.fixture
def signing_store(local_s3: LocalS3, buckets: tuple[str, str, str]) -> Iterator[S3Store]:
    store = S3Store(config_for(local_s3, buckets, expires_in=600), backoff_s=0.01)
    yield store
    store.close()


async def fetch(url: str) -> requests.Response:
    return await asyncio.to_thread(requests.get, url, timeout=10)


# --- the test server refuses what S3 refuses, with an independent signer ----------------------------


def boto(server: LocalS3, secret: str = SECRET) -> Any:
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=secret,
        config=config,
    )


def test_local_server_accepts_boto3_and_refuses_a_wrong_secret(
    local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    good, bad = boto(local_s3), boto(local_s3, WRONG_SECRET)
    good.put_object(Bucket=buckets[0], Key="check/a b+c.txt", Body=b"signed by boto3")
    body = good.get_object(Bucket=buckets[0], Key="check/a b+c.txt")["Body"].read()
    assert body == b"signed by boto3"
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        bad.get_object(Bucket=buckets[0], Key="check/a b+c.txt")
    url = good.generate_presigned_url(
        "get_object", Params={"Bucket": buckets[0], "Key": "check/a b+c.txt"}, ExpiresIn=60
    )
    assert requests.get(url, timeout=10).content == b"signed by boto3"
    local_s3.time_offset = 61
    assert requests.get(url, timeout=10).status_code == 403


# --- uploads ---------------------------------------------------------------------------------------


async def test_upload_stores_bytes_and_content_type_under_a_fresh_key(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    uploaded = await store.upload(None, b"\x89PNG fake image", "png", "image/png")

    assert KEY_PATTERN.fullmatch(uploaded.object)
    assert uploaded.to_payload() == {
        "region": REGION,
        "bucket": buckets[0],
        "object": uploaded.object,
        "url": None,
        "expire": None,
    }
    body, headers = local_s3.get_object(buckets[0], uploaded.object)
    assert (body, headers["content-type"]) == (b"\x89PNG fake image", "image/png")


async def test_a_file_bigger_than_a_part_is_uploaded_in_parts_from_disk(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * (4096 * 20) + b"tail"  # 20 MiB and 4 bytes: 3 parts of at most 8 MiB
    path = tmp_path / "ComfyUI_00001_.mp4"
    path.write_bytes(data)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("file read into memory"))

    uploaded = await store.upload(None, path, ".mp4", "video/mp4")

    body, headers = local_s3.get_object(buckets[0], uploaded.object)
    assert body == data and headers["content-type"] == "video/mp4"
    assert headers["etag"].endswith('-3"'), "S3 marks an object made of 3 parts"
    parts = [r for r in local_s3.requests if r.method == "PUT" and "partNumber" in r.query_names]
    assert sorted(r.body_bytes for r in parts) == [len(data) - 2 * 8 * 1024 * 1024, 8 * 1024 * 1024, 8 * 1024 * 1024]


async def test_upload_of_a_missing_file_is_an_output_error(store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="output file could not be read"):
        await store.upload(None, tmp_path / "gone.png", "png", "image/png")


async def test_upload_with_a_wrong_secret_is_an_output_error_that_keeps_the_secret(
    local_s3: LocalS3, buckets: tuple[str, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = S3Store(config_for(local_s3, buckets, keys=AwsKeys(KEY_ID, WRONG_SECRET)), backoff_s=0.01)

    with pytest.raises(OutputError) as info:
        await store.upload(None, b"x", "png", "image/png")

    assert info.value.message == f"S3 upload to bucket {buckets[0]} failed: SignatureDoesNotMatch (HTTP 403)"
    shown = "".join(traceback.format_exception(info.value)) + caplog.text + repr(store.config)
    assert not any(secret in shown for secret in SECRETS)
    assert KEY_ID not in repr(store.config)


async def test_upload_is_retried_after_a_transient_failure(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    local_s3.fail_next(1)

    uploaded = await store.upload(None, b"second time lucky", "png", "image/png")

    assert local_s3.get_object(buckets[0], uploaded.object)[0] == b"second time lucky"
    assert [r.status for r in local_s3.requests] == [503, 200]


# --- presigned URLs ---------------------------------------------------------------------------------


async def test_presigned_url_serves_the_object_until_it_expires(signing_store: S3Store, local_s3: LocalS3) -> None:
    uploaded = await signing_store.upload(None, b"signed bytes", "png", "image/png")

    assert uploaded.url is not None and uploaded.expire is not None
    assert uploaded.url.startswith(f"{local_s3.endpoint}/{uploaded.bucket}/{uploaded.object}?")
    query = parse_qs(urlsplit(uploaded.url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["600"]
    assert abs(uploaded.expire - (time.time() + 600)) < 60
    assert "X-Amz-Signature" not in repr(uploaded)
    response = await fetch(uploaded.url)
    assert (response.status_code, response.content) == (200, b"signed bytes")
    assert response.headers["Content-Type"] == "image/png"

    local_s3.time_offset = 601
    expired = await fetch(uploaded.url)
    assert expired.status_code == 403 and "<Code>AccessDenied</Code>" in expired.text and "expired" in expired.text


async def test_presigned_url_with_one_signature_character_changed_is_refused(signing_store: S3Store) -> None:
    uploaded = await signing_store.upload(None, b"signed bytes", "png", "image/png")
    assert uploaded.url is not None
    signature = parse_qs(urlsplit(uploaded.url).query)["X-Amz-Signature"][0]
    changed = signature[:10] + ("0" if signature[10] != "0" else "1") + signature[11:]

    refused = await fetch(uploaded.url.replace(signature, changed))

    assert refused.status_code == 403 and "SignatureDoesNotMatch" in refused.text


async def test_temporary_credentials_send_and_presign_their_session_token(
    local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    store = S3Store(config_for(local_s3, buckets, 600, AwsKeys(STS_ID, STS_SECRET, STS_TOKEN)), backoff_s=0.01)

    uploaded = await store.upload(None, b"temporary", "png", "image/png")

    assert uploaded.url is not None
    assert parse_qs(urlsplit(uploaded.url).query)["X-Amz-Security-Token"] == [STS_TOKEN]
    assert (await fetch(uploaded.url)).content == b"temporary"
    assert STS_TOKEN not in repr(store.config) and STS_SECRET not in repr(store.config)


async def test_sign_object_signs_anew_and_leaves_oss_image_processing_to_others(
    signing_store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    local_s3.put_object(buckets[0], "out/cat.png", b"cat", "image/png")

    url = await signing_store.sign_object(None, "out/cat.png", 60)
    assert url is not None and (await fetch(url)).content == b"cat"
    assert await signing_store.sign_object(None, "out/cat.png", 60, "image/format,jpg") is None


async def test_virtual_hosted_addressing_puts_the_bucket_in_the_host_name(
    local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    """The local server is the client's HTTP proxy, so `<bucket>.s3.test` needs no DNS."""
    out, extra, _ = buckets
    config = S3Config(out, REGION, "http://s3.test", "virtual", (extra,), expires_in=60, keys=AwsKeys(KEY_ID, SECRET))
    store = S3Store(config, backoff_s=0.01, proxy_url=local_s3.endpoint)
    local_s3.put_object(extra, "in/dog.png", b"dog")

    uploaded = await store.upload(None, b"virtual", "png", "image/png")
    read = await store.read(None, f"s3://{extra}/in/dog.png", 100)

    assert local_s3.get_object(out, uploaded.object)[0] == b"virtual" and read == b"dog"
    assert uploaded.url is not None and uploaded.url.startswith(f"http://{out}.s3.test/{uploaded.object}?")
    proxied = await asyncio.to_thread(requests.get, uploaded.url, proxies={"http": local_s3.endpoint}, timeout=10)
    assert proxied.content == b"virtual"
    assert [(r.method, r.path, r.status) for r in local_s3.requests] == [
        ("PUT", f"/{out}/{uploaded.object}", 200),
        ("GET", f"/{extra}/in/dog.png", 200),
        ("GET", f"/{out}/{uploaded.object}", 200),
    ]


# --- s3:// inputs -----------------------------------------------------------------------------------


async def test_read_streams_an_object_of_the_output_bucket_or_an_input_bucket(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    out, extra, _ = buckets
    local_s3.put_object(out, "in/cat one.png", b"cat bytes")
    local_s3.put_object(extra, "common/dog.png", b"dog bytes")

    assert await store.read(None, f"s3://{out}/in/cat one.png", 9) == b"cat bytes"
    assert await store.read(None, f"s3://{extra}/common/dog.png", 100) == b"dog bytes"


async def test_read_refuses_a_bucket_the_settings_do_not_name_without_asking_it(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    out, extra, foreign = buckets
    local_s3.put_object(foreign, "secret.png", b"not yours")  # the instance's keys could read it

    with pytest.raises(InputError) as info:
        await store.read(None, f"s3://{foreign}/secret.png", 100)

    assert info.value.message == (
        f"s3://{foreign}/secret.png is not readable by this instance (S3_BUCKET, S3_INPUT_BUCKETS: {out}, {extra})"
    )
    assert local_s3.requests == []


async def test_read_refuses_an_object_over_the_limit(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str]
) -> None:
    local_s3.put_object(buckets[0], "in/big.png", b"x" * 1000)

    with pytest.raises(InputError, match=r"is too large \(1000 bytes\): the limit is 999 bytes"):
        await store.read(None, f"s3://{buckets[0]}/in/big.png", 999)


async def test_read_of_a_missing_object_says_not_found(store: S3Store, buckets: tuple[str, str, str]) -> None:
    with pytest.raises(InputError) as info:
        await store.read(None, f"s3://{buckets[0]}/in/none-such.png", 100)
    assert info.value.message == f"s3://{buckets[0]}/in/none-such.png not found"


async def test_read_with_a_wrong_secret_says_access_denied(local_s3: LocalS3, buckets: tuple[str, str, str]) -> None:
    local_s3.put_object(buckets[0], "in/cat.png", b"cat")
    store = S3Store(config_for(local_s3, buckets, keys=AwsKeys(KEY_ID, WRONG_SECRET)), backoff_s=0.01)

    with pytest.raises(InputError) as info:
        await store.read(None, f"s3://{buckets[0]}/in/cat.png", 100)

    assert info.value.message == f"s3://{buckets[0]}/in/cat.png access denied: SignatureDoesNotMatch (HTTP 403)"


def listing(folder: Path) -> list[str]:
    """The names in `folder` (blocking, small)."""
    return sorted(path.name for path in folder.iterdir())


async def test_download_streams_an_object_to_disk_with_its_digest(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str], tmp_path: Path
) -> None:
    data = bytes(range(256)) * 12289  # 3 MiB and a bit: several chunks
    local_s3.put_object(buckets[1], "models/lora.safetensors", data)
    dest = tmp_path / "models" / "lora.safetensors"

    stored = await store.download(None, f"s3://{buckets[1]}/models/lora.safetensors", dest, len(data))

    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data and listing(dest.parent) == ["lora.safetensors"]


async def test_download_over_the_limit_or_missing_leaves_no_file(
    store: S3Store, local_s3: LocalS3, buckets: tuple[str, str, str], tmp_path: Path
) -> None:
    local_s3.put_object(buckets[0], "models/big.bin", b"x" * 1000)

    with pytest.raises(InputError, match="too large"):
        await store.download(None, f"s3://{buckets[0]}/models/big.bin", tmp_path / "big.bin", 999)
    with pytest.raises(InputError, match="not found"):
        await store.download(None, f"s3://{buckets[0]}/models/none.bin", tmp_path / "none.bin", 999)
    assert listing(tmp_path) == []


async def test_an_endpoint_that_does_not_answer_is_an_error_saying_so(buckets: tuple[str, str, str]) -> None:
    config = S3Config(buckets[0], REGION, f"http://127.0.0.1:{free_port()}", keys=AwsKeys(KEY_ID, SECRET))
    store = S3Store(config, attempts=2, backoff_s=0.01, timeout_s=5)

    with pytest.raises(OutputError) as upload:
        await store.upload(None, b"x", "png", "image/png")
    with pytest.raises(InputError) as read:
        await store.read(None, f"s3://{buckets[0]}/in/cat.png", 10)

    assert upload.value.message == f"S3 upload to bucket {buckets[0]} failed: cannot connect (after 1 retries)"
    assert read.value.message == f"s3://{buckets[0]}/in/cat.png could not be read: cannot connect (after 1 retries)"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("s3:///key.png", "invalid bucket name ''"),
        ("s3://UPPER/key.png", "invalid bucket name 'UPPER'"),
        ("s3://bucket", "no object key"),
        ("s3://bucket//key.png", "no object key"),
    ],
)
def test_parse_s3_url_says_what_is_wrong(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_s3_url(url)


def test_parse_s3_url_keeps_the_key_verbatim() -> None:
    assert parse_s3_url("S3://my.bucket-1/in/a b+c%20.png") == ("my.bucket-1", "in/a b+c%20.png")


# --- settings ---------------------------------------------------------------------------------------


def settings_config(env: dict[str, str]) -> S3Config:
    s3 = Settings.from_env({"STORAGE": "s3", **env}).s3
    return config_from_settings(s3.bucket, s3.region, s3.endpoint_url, s3.addressing, s3.input_buckets, "p", 60, s3.aws)


def test_addressing_is_virtual_on_aws_and_path_style_on_another_endpoint() -> None:
    aws = settings_config({"S3_BUCKET": "outputs", "AWS_REGION": "ap-south-1"})
    minio = settings_config({"S3_BUCKET": "outputs", "S3_ENDPOINT_URL": "http://minio:9000/"})
    virtual = settings_config(
        {"S3_BUCKET": "outputs", "S3_ENDPOINT_URL": "https://s3.example.com", "S3_ADDRESSING": "virtual"}
    )

    assert (aws.addressing, aws.endpoint, aws.region) == ("virtual", None, "ap-south-1")
    assert (minio.addressing, minio.endpoint, minio.region) == ("path", "http://minio:9000", "us-east-1")
    assert minio.bucket_endpoint("outputs") == "http://minio:9000"
    assert virtual.bucket_endpoint("inputs") == "https://inputs.s3.example.com"


def test_credentials_come_from_the_aws_variables_and_stay_out_of_repr() -> None:
    settings = Settings.from_env(
        {"STORAGE": "s3", "S3_BUCKET": "outputs", "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    )
    config = settings_config({"S3_BUCKET": "outputs", "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET})

    assert config.keys == AwsKeys(KEY_ID, SECRET)
    assert SECRET not in repr(settings) and KEY_ID not in repr(settings) and SECRET not in repr(config)


def test_a_profile_is_read_from_the_shared_files(tmp_path: Path) -> None:
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    (tmp_path / "config").write_text(
        f"[profile fleet]\naws_access_key_id = {STS_ID}\naws_secret_access_key = {STS_SECRET}\n"
        f"aws_session_token = {STS_TOKEN}\nregion = eu-west-1\n"
    )
    env = {
        "S3_BUCKET": "outputs",
        "AWS_PROFILE": "fleet",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
    }

    assert settings_config(env).keys == AwsKeys(STS_ID, STS_SECRET, STS_TOKEN)
    assert profile_keys("default", tmp_path / "credentials", tmp_path / "config") == AwsKeys("A", "B")
    with pytest.raises(ValueError, match="AWS_PROFILE='nobody': no aws_access_key_id"):
        settings_config({**env, "AWS_PROFILE": "nobody"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"S3_BUCKET": "Not_A_Bucket"}, "S3_BUCKET"),
        ({"S3_BUCKET": "outputs", "S3_INPUT_BUCKETS": "ok-one,x"}, "S3_INPUT_BUCKETS"),
        ({"S3_BUCKET": "outputs", "S3_ENDPOINT_URL": "ftp://minio"}, "S3_ENDPOINT_URL"),
        ({"S3_BUCKET": "outputs", "S3_ENDPOINT_URL": "http://k:s@minio"}, "S3_ENDPOINT_URL"),
    ],
)
def test_bad_s3_settings_are_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        settings_config(env)


def test_storage_s3_without_a_bucket_fails_start_up() -> None:
    with pytest.raises(SettingsError, match="STORAGE=s3 needs S3_BUCKET"):
        Settings.from_env({"STORAGE": "s3"})
    with pytest.raises(SettingsError, match="STORAGE='gcs': must be one of oss, s3"):
        Settings.from_env({"STORAGE": "gcs"})
    with pytest.raises(SettingsError, match="S3_ADDRESSING"):
        Settings.from_env({"STORAGE": "s3", "S3_BUCKET": "outputs", "S3_ADDRESSING": "dns"})
