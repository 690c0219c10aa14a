"""A caller's (or the instance's) Alibaba Cloud credentials (a pure value): resolved once per
request, never shown, never sent through a fleet's queue."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

_HEADER_NAMES = ("x-fc-access-key-id", "x-fc-access-key-secret", "x-fc-security-token")
_ENV_NAMES = ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN")


@dataclass(frozen=True, slots=True)
class Credentials:
    """An Alibaba Cloud access key pair, with the STS token when temporary (FC's request headers or
    the instance's `ALIBABA_CLOUD_*`). Nothing secret appears in `repr`.

    `from_caller` says whose they are: True for the request's own headers, False for the
    instance's (environment; on FC the function's role), which may read only what
    `OSS_INPUT_ALLOWED` lists. An S3 bucket uses the instance's AWS credentials and ignores these."""

    access_key_id: str = field(repr=False)
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    from_caller: bool = False

    @classmethod
    def resolve(cls, headers: Mapping[str, str], environ: Mapping[str, str]) -> Credentials | None:
        """The request's `x-fc-access-key-*` headers as a set, else the `ALIBABA_CLOUD_*` environment."""
        lowered = {name.lower(): value for name, value in headers.items()}
        for source, names, from_caller in ((lowered, _HEADER_NAMES, True), (environ, _ENV_NAMES, False)):
            key_id, secret, token = (source.get(name, "").strip() for name in names)
            if key_id and secret:
                return cls(key_id, secret, token or None, from_caller)
        return None
