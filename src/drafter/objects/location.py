"""Where a package lies in object storage, and the store client that reaches it.

``s3://BUCKET/KEY`` is an object in an S3-compatible store; ``https://HOST/PATH``
(and ``http://``) a file behind any HTTP server or CDN that answers range requests.
Both are reached through obstore (the Rust ``object_store`` crate's Python binding):
async, many requests in flight on few threads, and the fastest client measured here
(docs/objectstore.md).

S3's endpoint, region and credentials come from the standard AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` with
``~/.aws/credentials``), never from a flag that ``ps`` would show. Credentials are
always handed to the client explicitly: without them the client would ask the cloud
instance-metadata address, which is not ours to reach. ``AWS_SKIP_SIGNATURE=true``
reads a public bucket unsigned.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from drafter.errors import DrafterError

SCHEMES = ("s3", "http", "https")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CREDENTIALS_HELP = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with "
    "~/.aws/credentials; AWS_SKIP_SIGNATURE=true for a public bucket), and "
    "AWS_ENDPOINT_URL for a store that is not AWS"
)


def is_object_url(text: str | None) -> bool:
    """Whether ``text`` names an object (s3://, http://, https://), not HOST:PORT."""
    return bool(text) and str(text).split("://", 1)[0].lower() in SCHEMES and "://" in str(text)


@dataclass(frozen=True)
class ObjectLocation:
    """One object: its scheme, its bucket (S3) or server (HTTP), and its key."""

    scheme: str
    root: str  # the bucket, or scheme://host[:port]/ of an HTTP server
    key: str

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.root}/{self.key}"
        return f"{self.root}{self.key}"


def parse_location(text: str, what: str = "the object URL") -> ObjectLocation:
    """``s3://BUCKET/KEY`` or ``http(s)://HOST[:PORT]/PATH``; DrafterError with one
    line if it is not one (a user's flag: nothing in it is trusted)."""
    if len(text) > 2048 or not text.isprintable() or any(c.isspace() for c in text):
        raise DrafterError(f"{what} {text[:80]!r} is not a usable URL")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise DrafterError(f"{what} {text[:80]!r} is not a usable URL") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise DrafterError(f"{what} must start with s3://, https:// or http://, not {text[:80]!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise DrafterError(f"{what} must not carry a query, fragment or credentials")
    key = parts.path.lstrip("/")
    if not key or key.endswith("/") or ".." in key.split("/"):
        raise DrafterError(f"{what} {text!r} names no object (give BUCKET/KEY or HOST/PATH)")
    if scheme == "s3":
        if not _BUCKET.fullmatch(parts.netloc):
            raise DrafterError(f"{what}: {parts.netloc!r} is not an S3 bucket name")
        return ObjectLocation("s3", parts.netloc, key)
    if not parts.hostname:
        raise DrafterError(f"{what} {text!r} names no host")
    netloc = parts.hostname if port is None else f"{parts.netloc.rsplit(':', 1)[0]}:{port}"
    return ObjectLocation(scheme, f"{scheme}://{netloc}/", key)


@dataclass(frozen=True)
class StoreOptions:
    """How to reach a store: timeouts, retries, addressing and a CA to trust."""

    retry_timeout: float = 30.0  # retries of one request end after this long
    request_timeout: float = 30.0
    tls_ca: str | None = None  # a PEM file of extra roots to trust (a test CA)
    virtual_hosted: bool = False  # S3: BUCKET.ENDPOINT instead of ENDPOINT/BUCKET


def open_store(location: ObjectLocation, options: StoreOptions) -> Any:
    """An obstore store for ``location`` (its key is the path within it)."""
    from obstore.store import HTTPStore, S3Store

    client: Any = {
        "timeout": timedelta(seconds=options.request_timeout),
        "connect_timeout": timedelta(seconds=min(10.0, options.request_timeout)),
        "pool_idle_timeout": timedelta(seconds=30),
    }
    if options.tls_ca:
        try:
            client["root_certificate"] = Path(options.tls_ca).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DrafterError(f"cannot read the CA file {options.tls_ca}: {e}") from None
    retry: Any = {
        "max_retries": 10,
        "retry_timeout": timedelta(seconds=options.retry_timeout),
        "backoff": {
            "init_backoff": timedelta(milliseconds=50),
            "max_backoff": timedelta(seconds=2),
            "base": 2,
        },
    }
    if location.scheme != "s3":
        client["allow_http"] = location.scheme == "http"
        return HTTPStore(location.root, client_options=client, retry_config=retry)
    config = s3_config(os.environ, Path.home())
    endpoint = config.get("endpoint")
    if endpoint and str(endpoint).lower().startswith("http://"):
        client["allow_http"] = True
    config["virtual_hosted_style_request"] = options.virtual_hosted
    try:
        return S3Store(location.root, config=config, client_options=client, retry_config=retry)
    except Exception as e:  # obstore's configuration errors carry no stable class
        raise DrafterError(
            f"cannot use the S3 settings from the environment: {first_line(e)}"
        ) from None


def s3_config(env: os._Environ[str] | dict[str, str], home: Path) -> Any:
    """The S3 settings from the AWS environment (and ``~/.aws`` for a profile); every
    credential explicit. DrafterError (naming the variables to set) without any."""
    config: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        config["endpoint"] = endpoint
    config["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    if env.get("AWS_SKIP_SIGNATURE", "").lower() in ("1", "true", "yes"):
        config["skip_signature"] = True
        return config
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    token = env.get("AWS_SESSION_TOKEN")
    if not (key_id and secret):
        key_id, secret, token = _profile(env, home)
    if not (key_id and secret):
        raise DrafterError(f"no S3 credentials: {CREDENTIALS_HELP}")
    config["access_key_id"] = key_id
    config["secret_access_key"] = secret
    if token:
        config["token"] = token
    return config


def _profile(
    env: os._Environ[str] | dict[str, str], home: Path
) -> tuple[str | None, str | None, str | None]:
    """Credentials of ``AWS_PROFILE`` (default: "default") in the shared credentials file."""
    path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    profile = env.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError):
        raise DrafterError(f"cannot read the AWS credentials file {path}") from None
    if not parser.has_section(profile):
        return None, None, None
    section = parser[profile]
    return (
        section.get("aws_access_key_id"),
        section.get("aws_secret_access_key"),
        section.get("aws_session_token"),
    )


def first_line(error: BaseException) -> str:
    """An obstore error's first meaningful line, short (its messages are Debug dumps)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line[:200]
