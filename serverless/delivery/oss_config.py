"""OSS settings, checked (pure): the output bucket and where uploads and signed URLs go
(`OssConfig`), the buckets `oss://` inputs may read (`ReadRule`), and `oss://` URLs taken apart.
`delivery/oss.py` speaks to the bucket (and loads oss2, which an instance without OSS never does)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["ALIYUN_HOST", "MAX_EXPIRES_S", "OssConfig", "ReadRule", "parse_oss_url", "read_rules"]

DEFAULT_KEY_PREFIX = "serverless-api-output"
MAX_EXPIRES_S = 7 * 24 * 3600  # the longest a V4 presigned URL may live
_HOST = r"oss-(?P<region>[a-z0-9-]+?)(?P<internal>-internal)?\.aliyuncs\.com"
_DOMAIN = re.compile(r"(?P<bucket>[a-z0-9][a-z0-9-]{1,61}[a-z0-9])\.(?P<host>" + _HOST + ")")
ALIYUN_HOST = re.compile(_HOST)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


def _endpoint_url(value: str, setting: str, default_scheme: str = "https") -> str:
    """`scheme://host[:port]` from a host or URL setting; ValueError naming the setting otherwise."""
    parts = urlsplit(value.strip() if "://" in value else f"{default_scheme}://{value.strip()}")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise ValueError(f"{setting}: expected a host or an http(s) URL without a path, got {value!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


@dataclass(frozen=True, slots=True)
class OssConfig:
    """Where outputs go. `region` is reported as configured (`oss-cn-hangzhou`); V4 signing uses
    `signing_region` (`cn-hangzhou`). `expires_in` 0 means upload only, no signed URL."""

    bucket: str
    region: str
    endpoint: str  # URL that uploads and reads go to
    sign_endpoint: str  # URL that signed GET URLs point at
    key_prefix: str = DEFAULT_KEY_PREFIX
    expires_in: int = 0

    @property
    def signing_region(self) -> str:
        return self.region.removeprefix("oss-")

    @classmethod
    def from_values(
        cls,
        bucket_domain: str | None,
        endpoint: str | None = None,
        sign_endpoint: str | None = None,
        key_prefix: str | None = None,
        expires_in: str | int | None = None,
    ) -> OssConfig | None:
        """Build from the raw settings (CONTRACT.md section 6); None when no bucket domain is set."""
        if not bucket_domain or not bucket_domain.strip():
            return None
        domain = _endpoint_url(bucket_domain, "OSS_BUCKET_DOMAIN")
        scheme, host = domain.split("://", 1)
        match = _DOMAIN.fullmatch(host.split(":", 1)[0])
        if match is None:
            raise ValueError(f"OSS_BUCKET_DOMAIN: expected <bucket>.oss-<region>.aliyuncs.com, got {bucket_domain!r}")
        port = host[len(match[0]) :]
        # Uploads go where the domain says (maybe an internal endpoint); signed URLs are for
        # callers outside, so they default to the public endpoint of the same region.
        own = f"{scheme}://{match['host']}{port}"
        public = f"{scheme}://oss-{match['region']}.aliyuncs.com{port}"
        return cls(
            bucket=match["bucket"],
            region=f"oss-{match['region']}",
            endpoint=_endpoint_url(endpoint, "OSS_ENDPOINT") if endpoint else own,
            sign_endpoint=_endpoint_url(sign_endpoint, "OSS_SIGN_ENDPOINT") if sign_endpoint else public,
            key_prefix=_key_prefix(key_prefix),
            expires_in=_expires_in(expires_in),
        )


def _key_prefix(value: str | None) -> str:
    if value is None:
        return DEFAULT_KEY_PREFIX
    prefix = value.strip().strip("/")
    if prefix and ("\\" in prefix or any(part in ("", ".", "..") for part in prefix.split("/"))):
        raise ValueError(f"OSS_KEY_PREFIX: not a usable key prefix: {value!r}")
    return prefix


def _expires_in(value: str | int | None) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0
    try:
        seconds = int(value)
    except ValueError:
        raise ValueError(f"OSS_EXPIRES_IN_SECOND: expected whole seconds, got {value!r}") from None
    if not 0 <= seconds <= MAX_EXPIRES_S:
        raise ValueError(f"OSS_EXPIRES_IN_SECOND: must be from 0 to {MAX_EXPIRES_S} (7 days), got {seconds}")
    return seconds


@dataclass(frozen=True, slots=True)
class ReadRule:
    """An `OSS_INPUT_ALLOWED` entry: a bucket, or a bucket and a key prefix taken as a folder
    (`in` allows `in/cat.png`, not `internal/x`)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, entry: str) -> ReadRule:
        """`bucket` or `bucket/prefix`; ValueError naming OSS_INPUT_ALLOWED otherwise."""
        bucket, _, prefix = entry.strip().partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.fullmatch(bucket) or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
            raise ValueError(f"OSS_INPUT_ALLOWED: expected bucket or bucket/prefix, got {entry!r}")
        return cls(bucket, prefix)

    def allows(self, bucket: str, key: str) -> bool:
        if bucket != self.bucket:
            return False
        if not self.prefix:
            return True
        # A prefix is a folder: "." and ".." segments could lead out of it on the way to OSS.
        parts = key.split("/")
        return key.startswith(self.prefix + "/") and not any(p in (".", "..") for p in parts)

    def __str__(self) -> str:
        return f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket


def read_rules(entries: Sequence[str] | None, config: OssConfig) -> tuple[ReadRule, ...]:
    """The rules for the instance's credentials: `entries` parsed, or (None) the configured bucket."""
    if entries is None:
        return (ReadRule(config.bucket),)
    return tuple(ReadRule.parse(entry) for entry in entries)


def parse_oss_url(url: str, default_endpoint: str | None) -> tuple[str, str, str]:
    """`oss://<bucket>.<endpoint>/<key>` -> (bucket, endpoint host, key); `oss://<bucket>/<key>` ->
    (bucket, default_endpoint, key). The key is taken verbatim. ValueError says what is wrong."""
    if url[:6].lower() != "oss://":
        raise ValueError("not an oss:// URL")
    authority, _, key = url[6:].partition("/")
    bucket, dot, endpoint = authority.lower().partition(".")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}")
    if not key or key.startswith("/"):
        raise ValueError("no object key")
    if dot and not endpoint:
        raise ValueError("empty endpoint")
    if not dot:
        if default_endpoint is None:
            raise ValueError("no endpoint in the URL and none configured")
        endpoint = default_endpoint
    return bucket, endpoint, key
