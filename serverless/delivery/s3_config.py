"""S3 settings, checked: the output bucket and the others `s3://` inputs may read, the endpoint and
its addressing, and the instance's AWS keys (from the AWS variables or a profile's shared files).
Pure but for reading a profile; `delivery/s3.py` speaks to the bucket."""

from __future__ import annotations

import configparser
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Addressing = Literal["path", "virtual"]
MAX_EXPIRES_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
DEFAULT_REGION = "us-east-1"
# S3's bucket naming rules (the strict ones every S3-compatible service accepts).
_BUCKET = re.compile(r"(?!xn--)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True, slots=True)
class AwsKeys:
    """A static AWS key pair, with the session token when temporary. Nothing secret in `repr`."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class S3Config:
    """The output bucket and how to reach it; `input_buckets` are the others `s3://` may read.
    `endpoint` None means AWS itself (`s3.<region>.amazonaws.com`)."""

    bucket: str
    region: str = DEFAULT_REGION
    endpoint: str | None = None
    addressing: Addressing = "path"
    input_buckets: tuple[str, ...] = ()
    key_prefix: str = "serverless-api-output"
    expires_in: int = 0
    keys: AwsKeys | None = field(default=None, repr=False)

    @property
    def readable(self) -> tuple[str, ...]:
        """Every bucket `s3://` inputs may name: the output bucket, then S3_INPUT_BUCKETS."""
        return (self.bucket, *(b for b in self.input_buckets if b != self.bucket))

    def bucket_endpoint(self, bucket: str) -> str | None:
        """The URL obstore is given for `bucket`. Virtual-hosted addressing with an endpoint puts the
        bucket in the host name, as obstore expects it there (`https://<bucket>.<host>`)."""
        if self.endpoint is None or self.addressing == "path":
            return self.endpoint
        parts = urlsplit(self.endpoint)
        return f"{parts.scheme}://{bucket}.{parts.netloc}"


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://<bucket>/<key>` -> (bucket, key), the key verbatim; ValueError says what is wrong."""
    if url[:5].lower() != "s3://":
        raise ValueError("not an s3:// URL")
    bucket, _, key = url[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}")
    if not key or key.startswith("/"):
        raise ValueError("no object key")
    return bucket, key


def check_bucket(name: str, setting: str) -> str:
    """`name` when it is a valid S3 bucket name; ValueError naming `setting` otherwise."""
    if not _BUCKET.fullmatch(name):
        raise ValueError(f"{setting}: not a valid S3 bucket name: {name!r}")
    return name


def endpoint_url(value: str) -> str:
    """`scheme://host[:port]` from S3_ENDPOINT_URL; ValueError naming it otherwise."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"S3_ENDPOINT_URL: expected an http(s) URL without a path, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("S3_ENDPOINT_URL: credentials do not belong in the URL (use AWS_ACCESS_KEY_ID)")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def profile_keys(profile: str, credentials_file: Path, config_file: Path) -> AwsKeys | None:
    """A profile's static keys from the AWS shared files (credentials first, then config's
    `[profile <name>]`); None when neither holds a key pair for it. Blocking: read at start-up."""
    for path, section in ((credentials_file, profile), (config_file, f"profile {profile}"), (config_file, profile)):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error) as exc:
            raise ValueError(f"AWS_PROFILE={profile!r}: {path} cannot be read ({type(exc).__name__})") from None
        if not parser.has_section(section):
            continue
        values = parser[section]
        key_id, secret = values.get("aws_access_key_id"), values.get("aws_secret_access_key")
        if key_id and secret:
            return AwsKeys(key_id.strip(), secret.strip(), (values.get("aws_session_token") or "").strip() or None)
    return None


def config_from_settings(
    bucket: str,
    region: str,
    endpoint: str,
    addressing: str,
    input_buckets: tuple[str, ...],
    key_prefix: str,
    expires_in: int,
    aws: Mapping[str, str],
) -> S3Config:
    """The S3 settings checked (ValueError naming the variable); keys from `aws` (the AWS_*
    variables), else from the profile it names. Blocking when a profile is read: at start-up."""
    if not bucket:
        raise ValueError("STORAGE=s3 needs S3_BUCKET (the bucket outputs are uploaded to)")
    check_bucket(bucket, "S3_BUCKET")
    for name in input_buckets:
        check_bucket(name, "S3_INPUT_BUCKETS")
    url = endpoint_url(endpoint) if endpoint else None
    if addressing not in ("auto", "path", "virtual"):
        raise ValueError(f"S3_ADDRESSING: expected auto, path or virtual, got {addressing!r}")
    # auto: virtual-hosted on AWS itself (its default), path-style on another endpoint (MinIO's).
    style: Addressing = "virtual" if addressing == "virtual" or (addressing == "auto" and url is None) else "path"
    if not 0 <= expires_in <= MAX_EXPIRES_S:
        raise ValueError(f"OSS_EXPIRES_IN_SECOND: must be from 0 to {MAX_EXPIRES_S} (7 days) on S3")
    return S3Config(bucket, region or DEFAULT_REGION, url, style, input_buckets, key_prefix, expires_in, _keys(aws))


def _keys(aws: Mapping[str, str]) -> AwsKeys | None:
    key_id, secret = aws.get("AWS_ACCESS_KEY_ID", ""), aws.get("AWS_SECRET_ACCESS_KEY", "")
    if key_id and secret:
        return AwsKeys(key_id, secret, aws.get("AWS_SESSION_TOKEN") or None)
    profile = aws.get("AWS_PROFILE")
    if not profile:
        return None  # obstore's own chain: web identity, container credentials, instance metadata
    home = Path.home() / ".aws"
    credentials = Path(aws.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials")
    config = Path(aws.get("AWS_CONFIG_FILE") or home / "config")
    keys = profile_keys(profile, credentials, config)
    if keys is None:
        raise ValueError(
            f"AWS_PROFILE={profile!r}: no aws_access_key_id/aws_secret_access_key for it in {credentials} or {config}"
        )
    return keys
