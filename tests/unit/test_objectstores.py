"""The real object-store servers of support/objectstores.py, tested as the other tests
use them: SeaweedFS's S3 (signed requests only, conditional puts, gone after stop())
and nginx (read-only, ranges, TLS from a test CA, a restart on the same port)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import obstore as obs
import pytest
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError

from drafter.objects.location import StoreOptions, open_store, parse_location
from support.objectstores import (
    SERVERS,
    NginxFactory,
    SeaweedS3,
    pid_alive,
    port_answers,
    sigv4_headers,
)

BUCKET = "drafter"


def unique_key() -> str:
    return f"test-objectstores/{uuid.uuid4().hex}"


def http_status(request: urllib.request.Request) -> int:
    """The status of one request to loopback (an error status is an answer too)."""
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


# -- SeaweedFS ------------------------------------------------------------------------


def test_put_get_and_range(seaweed: SeaweedS3) -> None:
    store, key = seaweed.store(BUCKET), unique_key()
    data = os.urandom(3 * 1024 * 1024 + 17)
    obs.put(store, key, data)
    assert bytes(obs.get(store, key).bytes()) == data
    assert (
        bytes(obs.get_range(store, key, start=1_000_000, end=2_500_001))
        == (data[1_000_000:2_500_001])
    )
    head = obs.head(store, key)
    assert head["size"] == len(data) and head["e_tag"]


def test_wrong_secret_is_refused(seaweed: SeaweedS3) -> None:
    key = unique_key()
    obs.put(seaweed.store(BUCKET), key, b"secret")
    wrong = seaweed.store(BUCKET, secret_access_key=seaweed.secret_key + "x")
    with pytest.raises(PermissionDeniedError):
        obs.get(wrong, key).bytes()
    with pytest.raises(PermissionDeniedError):
        obs.put(wrong, unique_key(), b"never")


def test_unsigned_or_badly_signed_http_gets_403(seaweed: SeaweedS3) -> None:
    key = unique_key()
    obs.put(seaweed.store(BUCKET), key, b"private")
    url = f"{seaweed.endpoint}/{BUCKET}/{key}"
    assert http_status(urllib.request.Request(url)) == 403
    assert http_status(urllib.request.Request(url, data=b"x", method="PUT")) == 403
    assert http_status(urllib.request.Request(f"{seaweed.endpoint}/unsigned", method="PUT")) == 403
    forged = sigv4_headers("GET", url, seaweed.access_key, "not-the-secret", seaweed.region)
    assert http_status(urllib.request.Request(url, headers=forged)) == 403
    signed = sigv4_headers("GET", url, seaweed.access_key, seaweed.secret_key, seaweed.region)
    assert http_status(urllib.request.Request(url, headers=signed)) == 200
    assert bytes(obs.get(seaweed.store(BUCKET), key).bytes()) == b"private"


def test_create_mode_refuses_an_existing_key(seaweed: SeaweedS3) -> None:
    store, key = seaweed.store(BUCKET), unique_key()
    obs.put(store, key, b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        obs.put(store, key, b"second", mode="create")
    assert bytes(obs.get(store, key).bytes()) == b"first"


def test_env_names_the_store(seaweed: SeaweedS3) -> None:
    env = seaweed.env()
    assert env["AWS_ENDPOINT_URL"] == seaweed.endpoint == f"http://127.0.0.1:{seaweed.port}"
    assert env["AWS_ACCESS_KEY_ID"] == seaweed.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == seaweed.secret_key
    assert env["AWS_REGION"] == "us-east-1" and env["AWS_ALLOW_HTTP"] == "true"


def test_stop_leaves_nothing(workdir: Path) -> None:
    server = SeaweedS3(workdir / "s3")
    sockets = server.sockets()[: len(SERVERS)]  # the gRPC ones: it makes those
    # Not waiting for writes (5 s more): every port and socket is there before that.
    with server.start(writes=False):
        pid = server.pid
        assert pid is not None and pid_alive(pid)
        assert all(port_answers(port) for port in server.ports.values()), server.ports
        assert all(path.is_socket() for path in sockets)  # what stop() must remove
        server.create_bucket("another")
    assert not pid_alive(pid)
    assert not any(port_answers(port) for port in server.ports.values())
    assert not any(path.exists() for path in sockets)
    assert not any(Path("/tmp").glob(f"weed.*.{pid}"))  # glog files: it logs to stderr


# -- nginx ----------------------------------------------------------------------------


def served(workdir: Path, size: int = 256 * 1024) -> tuple[Path, bytes]:
    root = workdir / "root"
    root.mkdir(exist_ok=True)
    data = os.urandom(size)
    (root / "pkg").write_bytes(data)
    return root, data


def test_nginx_answers_ranges_with_206(nginx_factory: NginxFactory, workdir: Path) -> None:
    root, data = served(workdir)
    server = nginx_factory(root)
    assert server.url == f"http://127.0.0.1:{server.port}/"
    request = urllib.request.Request(server.url + "pkg", headers={"Range": "bytes=1000-5999"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-5999/{len(data)}"
        assert response.headers["ETag"]
        assert response.read() == data[1000:6000]
    head = urllib.request.Request(server.url + "pkg", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200 and response.headers["Accept-Ranges"] == "bytes"
        assert int(response.headers["Content-Length"]) == len(data)


def test_nginx_is_read_only(nginx_factory: NginxFactory, workdir: Path) -> None:
    root, data = served(workdir)
    server = nginx_factory(root)
    for method, path in (("PUT", "pkg"), ("PUT", "new"), ("POST", "pkg"), ("DELETE", "pkg")):
        request = urllib.request.Request(server.url + path, data=b"x", method=method)
        assert http_status(request) in (403, 405), (method, path)
    assert (root / "pkg").read_bytes() == data and sorted(os.listdir(root)) == ["pkg"]


def test_nginx_over_tls_needs_its_ca(nginx_factory: NginxFactory, workdir: Path) -> None:
    root, data = served(workdir)
    server = nginx_factory(root, tls=True)
    assert server.url == f"https://127.0.0.1:{server.port}/" and server.ca_pem
    location = parse_location(server.url + "pkg")
    trusting = open_store(location, StoreOptions(tls_ca=str(server.ca_pem)))
    assert bytes(obs.get(trusting, location.key).bytes()) == data
    assert bytes(obs.get_range(trusting, location.key, start=7, end=4103)) == data[7:4103]
    untrusting = open_store(location, StoreOptions(retry_timeout=1, request_timeout=5))
    with pytest.raises(Exception, match="(?i)error sending request|certificate"):
        obs.get(untrusting, location.key).bytes()


def test_nginx_restarts_on_its_port(nginx_factory: NginxFactory, workdir: Path) -> None:
    root, data = served(workdir, size=1000)
    server = nginx_factory(root)
    port, first = server.port, server.pid
    server.stop()
    assert first is not None and not pid_alive(first) and not port_answers(port)
    server.restart()
    assert server.port == port and server.pid != first
    with urllib.request.urlopen(server.url + "pkg", timeout=10) as response:
        assert response.read() == data
    server.stop()
    assert server.pid is not None and not pid_alive(server.pid) and not port_answers(port)
