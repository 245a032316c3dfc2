"""The hostile HTTP object server (support.hostile_http), and what obstore does with
each of its faults.

The first half speaks HTTP by hand (http.client) to check that the server serves
ranges, validators and persistent connections as a store does, and that each fault is
what it says. The second half drives it with obstore's HTTPStore and asserts what
obstore (0.12.1, object_store 0.14) does: these tests fail if obstore's behaviour
changes, and the comment at each says what a client built on it must do itself.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from collections.abc import Awaitable, Iterator
from datetime import timedelta
from typing import Any

import obstore
import pytest
from obstore.exceptions import GenericError, NotModifiedError, NotSupportedError, PreconditionError
from obstore.store import HTTPStore

from support.hostile_http import LOOPBACK, Fault, HostileServer

PATH = "pkg/blob"
DATA = bytes((i * 7 + i // 251) % 256 for i in range(100_000))
RETRY: Any = {
    "max_retries": 2,
    "retry_timeout": timedelta(seconds=2),
    "backoff": {
        "init_backoff": timedelta(milliseconds=10),
        "max_backoff": timedelta(milliseconds=50),
        "base": 2,
    },
}


def run(coro: Awaitable[Any], timeout: float = 30) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def server() -> Iterator[HostileServer]:
    with HostileServer() as s:
        s.put(PATH, DATA)
        yield s


def store_of(server: HostileServer, **client: Any) -> HTTPStore:
    return HTTPStore(server.url, client_options={"allow_http": True, **client}, retry_config=RETRY)


def connect(server: HostileServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(LOOPBACK, server.port, timeout=5)


def ask(
    conn: http.client.HTTPConnection, method: str, path: str = PATH, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, "/" + path, headers={k.replace("_", "-"): v for k, v in headers.items()})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


async def get_range(store: HTTPStore, start: int, end: int) -> bytes:
    return bytes(await obstore.get_range_async(store, PATH, start=start, end=end))


async def get_whole(store: HTTPStore) -> bytes:
    result = await obstore.get_async(store, PATH)
    return bytes(await result.bytes_async())


# --- the server by hand ---------------------------------------------------------------


def test_listens_on_loopback_only(server: HostileServer) -> None:
    assert server.url == f"http://127.0.0.1:{server.port}/"
    assert server.server is not None
    assert [s.getsockname()[0] for s in server.server.sockets] == [LOOPBACK]


def test_ranges_validators_and_one_connection(server: HostileServer) -> None:
    etag = server.etag(PATH)
    conn = connect(server)
    status, headers, body = ask(conn, "GET")
    assert (status, body, headers["etag"], headers["content-length"]) == (
        200,
        DATA,
        etag,
        str(len(DATA)),
    )
    status, headers, body = ask(conn, "GET", range="bytes=10-19")
    assert (status, body) == (206, DATA[10:20])
    assert headers["content-range"] == f"bytes 10-19/{len(DATA)}"
    assert headers["content-length"] == "10"
    assert ask(conn, "GET", range="bytes=99990-")[2] == DATA[99990:]
    assert ask(conn, "GET", range="bytes=-5")[2] == DATA[-5:]
    assert ask(conn, "GET", range="bytes=99995-200000")[2] == DATA[99995:]  # clipped
    status, headers, body = ask(conn, "HEAD")
    assert (status, body, headers["content-length"], headers["etag"]) == (
        200,
        b"",
        str(len(DATA)),
        etag,
    )
    for bad in ("bytes=100000-", "bytes=20-10", "bytes=0-1,5-6", "bytes=x-y", "items=0-1"):
        status, headers, _ = ask(conn, "GET", range=bad)
        assert (status, headers["content-range"]) == (416, f"bytes */{len(DATA)}"), bad
    assert ask(conn, "GET", if_match=etag, range="bytes=0-0")[:3:2] == (206, DATA[:1])
    assert ask(conn, "GET", if_match='"other", ' + etag)[0] == 200
    assert ask(conn, "GET", if_match="*")[0] == 200
    assert ask(conn, "GET", if_match='"other"')[0] == 412
    assert ask(conn, "HEAD", if_match='"other"')[0] == 412
    status, headers, body = ask(conn, "GET", if_none_match=etag)
    assert (status, body, headers["etag"]) == (304, b"", etag)
    assert ask(conn, "GET", if_none_match="W/" + etag)[0] == 304  # weak comparison
    assert ask(conn, "GET", if_none_match='"other"')[0] == 200
    assert ask(conn, "GET", "missing")[0] == 404
    assert ask(conn, "PUT")[0] == 405
    assert server.connections == 1  # every request above on one connection
    assert server.requests[:2] == [("GET", PATH, None), ("GET", PATH, "bytes=10-19")]
    ask(conn, "GET", connection="close")
    ask(conn, "GET")  # http.client reconnects
    assert server.connections == 2
    conn.close()


def test_after_and_count(server: HostileServer) -> None:
    server.fault(Fault.UNAVAILABLE, after=1, count=2)
    conn = connect(server)
    assert ask(conn, "HEAD")[0] == 200  # HEAD neither counts nor is affected
    statuses = [ask(conn, "GET", range="bytes=0-9")[0] for _ in range(5)]
    assert statuses == [206, 503, 503, 206, 206]
    server.fault(Fault.NONE)
    server.fault(Fault.WHOLE_OBJECT, path="other")
    assert ask(conn, "GET", range="bytes=0-9")[0] == 206  # only GETs to "other"
    assert server.gets() == 6 and server.gets(PATH) == 6
    conn.close()


def test_each_fault_by_hand(server: HostileServer) -> None:
    etag = server.etag(PATH)
    conn = connect(server)
    server.fault(Fault.FLIP_BYTE, offset=15, count=2)
    body = ask(conn, "GET", range="bytes=10-19")[2]
    assert body != DATA[10:20] and body[:5] + body[6:] == DATA[10:15] + DATA[16:20]
    assert body[5] == DATA[15] ^ 0xFF
    assert ask(conn, "GET", range="bytes=20-29")[2] == DATA[20:30]  # offset not in it

    server.fault(Fault.WHOLE_OBJECT, count=1)
    status, headers, body = ask(conn, "GET", range="bytes=10-19")
    assert (status, body, "content-range" in headers) == (200, DATA, False)

    server.fault(Fault.WRONG_LENGTH, count=2)
    status, headers, body = ask(conn, "GET", range="bytes=10-19")
    assert (status, body, headers["content-range"], headers["content-length"]) == (
        206,
        DATA[10:19],
        f"bytes 10-18/{len(DATA)}",
        "9",
    )
    assert ask(conn, "GET", range="bytes=10-10")[2] == DATA[10:12]  # one byte: one more

    server.fault(Fault.UNAVAILABLE, count=1)
    status, headers, body = ask(conn, "GET")
    assert (status, headers["retry-after"]) == (503, "0")
    assert b"<Code>SlowDown</Code>" in body

    server.fault(Fault.REPLACE, after=1)
    assert ask(conn, "GET")[2] == DATA  # the request before the replacement
    status, headers, body = ask(conn, "GET")
    assert body == bytes(b ^ 0xFF for b in DATA) == server.data(PATH)
    assert headers["etag"] == server.etag(PATH) != etag
    assert ask(conn, "GET", if_match=etag)[0] == 412
    assert server.connections == 1

    server.fault(Fault.TRUNCATE, count=1)
    conn.request("GET", "/" + PATH, headers={"Range": "bytes=0-999"})
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == "1000"
    with pytest.raises(http.client.IncompleteRead) as e:
        resp.read()
    assert len(e.value.partial) == 500
    conn.close()


def test_stall_holds_until_stop() -> None:
    server = HostileServer()
    server.start()
    server.put(PATH, DATA)
    server.fault(Fault.STALL)
    sock = socket.create_connection((LOOPBACK, server.port), timeout=0.5)
    sock.sendall(f"GET /{PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    with pytest.raises(TimeoutError):
        sock.recv(1)  # read, never answered
    assert server.requests == [("GET", PATH, None)]
    began = time.monotonic()
    server.stop()
    assert time.monotonic() - began < 2
    sock.settimeout(2)
    assert sock.recv(1) == b""  # stop() closed the stalled connection
    sock.close()


# --- what obstore does ----------------------------------------------------------------


def test_obstore_reads_and_reuses_one_connection(server: HostileServer) -> None:
    store = store_of(server)

    async def reads() -> None:
        for i in range(5):
            assert await get_range(store, i * 1000, i * 1000 + 10) == DATA[i * 1000 : i * 1000 + 10]
        meta = await obstore.head_async(store, PATH)
        assert (meta["size"], meta["e_tag"]) == (len(DATA), server.etag(PATH))
        result = await obstore.get_async(
            store, PATH, options={"range": (10, 20), "if_match": server.etag(PATH)}
        )
        assert bytes(await result.bytes_async()) == DATA[10:20]
        assert result.range == (10, 20)

    run(reads())
    assert bytes(obstore.get_range(store, PATH, start=0, end=3)) == DATA[:3]  # sync too
    # obstore's Range header is inclusive (end - 1); it keeps one connection alive.
    assert server.requests[0] == ("GET", PATH, "bytes=0-9")
    assert server.requests[5] == ("HEAD", PATH, None)
    assert server.connections <= 2  # the sync call may use a client pool of its own


def test_obstore_range_past_the_end(server: HostileServer) -> None:
    store = store_of(server)
    # A range ending past the object: obstore returns what there is, no error (the
    # caller must check the length).
    assert run(get_range(store, 99_000, 100_500)) == DATA[99_000:]
    # A range starting at or after the end: the server's 416, as a GenericError, once.
    with pytest.raises(GenericError, match="416 Range Not Satisfiable"):
        run(get_range(store, 100_000, 100_010))
    assert server.gets() == 2


def test_obstore_flip_byte(server: HostileServer) -> None:
    server.fault(Fault.FLIP_BYTE, offset=1500)
    # obstore has no way to notice: the flipped byte reaches the caller, no error.
    got = run(get_range(store_of(server), 1000, 2000))
    assert got != DATA[1000:2000] and got[500] == DATA[1500] ^ 0xFF
    assert server.gets() == 1


def test_obstore_whole_object_for_a_range(server: HostileServer) -> None:
    server.fault(Fault.WHOLE_OBJECT)
    # A 200 to a range request: NotSupportedError, not retried.
    with pytest.raises(NotSupportedError, match="Range request not supported by pkg/blob"):
        run(get_range(store_of(server), 1000, 2000))
    assert server.gets() == 1


def test_obstore_truncated_body(server: HostileServer) -> None:
    server.fault(Fault.TRUNCATE)
    # A body cut short: obstore resumes from the byte it got to, on a new connection,
    # and these resumptions count against max_retries (2): 3 requests, then a
    # GenericError about the body.
    with pytest.raises(GenericError, match="request or response body error") as e:
        run(get_range(store_of(server), 1000, 2000))
    assert "IncompleteBody" in str(e.value)
    assert server.requests == [
        ("GET", PATH, "bytes=1000-1999"),
        ("GET", PATH, "bytes=1500-1999"),
        ("GET", PATH, "bytes=1750-1999"),
    ]
    assert server.connections == 3


def test_obstore_truncated_once(server: HostileServer) -> None:
    server.fault(Fault.TRUNCATE, count=1)
    # Cut once: the resumption completes it; the caller sees the right bytes.
    store = store_of(server)
    assert run(get_whole(store)) == DATA
    assert server.requests == [("GET", PATH, None), ("GET", PATH, "bytes=50000-99999")]


def test_obstore_truncated_then_replaced(server: HostileServer) -> None:
    server.fault(Fault.TRUNCATE, count=1)
    server.fault(Fault.REPLACE, after=1)
    # The resumption is sent without If-Match, but obstore compares the ETag of its
    # answer with the first one: it gives up at once (no further retry) and raises the
    # first error, the cut body, not a PreconditionError. No mixed bytes reach the caller.
    with pytest.raises(GenericError, match="request or response body error"):
        run(get_whole(store_of(server)))
    assert server.requests == [("GET", PATH, None), ("GET", PATH, "bytes=50000-99999")]
    assert "if-match" not in server.headers[1]


def test_obstore_wrong_length(server: HostileServer) -> None:
    server.fault(Fault.WRONG_LENGTH)
    store = store_of(server)
    # A range one byte short (with headers that agree): obstore compares Content-Range
    # with what it asked for and raises a GenericError, not retried.
    with pytest.raises(GenericError, match=r"Requested 1000\.\.2000, got 1000\.\.1999"):
        run(get_range(store, 1000, 2000))
    assert server.gets() == 1
    # A whole object one byte short: obstore cannot know; the caller gets 99999 bytes.
    assert run(get_whole(store)) == DATA[:-1]


def test_obstore_unavailable(server: HostileServer) -> None:
    server.fault(Fault.UNAVAILABLE)
    # 503 for ever: 1 + max_retries (2) requests, on the same connection, then a
    # GenericError quoting the status and the SlowDown body.
    with pytest.raises(GenericError, match="after 2 retries, max_retries: 2") as e:
        run(get_range(store_of(server), 1000, 2000))
    assert "503 Service Unavailable" in str(e.value) and "SlowDown" in str(e.value)
    assert server.requests == [("GET", PATH, "bytes=1000-1999")] * 3
    assert server.connections == 1


def test_obstore_unavailable_then_fine(server: HostileServer) -> None:
    server.fault(Fault.UNAVAILABLE, count=2)
    # Two 503s, then an answer: within max_retries, so the caller sees only the bytes.
    assert run(get_range(store_of(server), 1000, 2000)) == DATA[1000:2000]
    assert server.gets() == 3


def test_obstore_replaced_with_if_match(server: HostileServer) -> None:
    etag = server.etag(PATH)
    server.fault(Fault.REPLACE)
    store = store_of(server)

    async def stale() -> None:
        await obstore.get_async(store, PATH, options={"range": (0, 10), "if_match": etag})

    # If-Match with the old ETag: PreconditionError (the 412), not retried.
    with pytest.raises(PreconditionError, match="412 Precondition Failed"):
        run(stale())
    assert server.headers[0]["if-match"] == etag
    assert server.gets() == 1
    # Without If-Match, the new bytes come back and nothing says they changed.
    assert run(get_range(store, 0, 10)) == server.data(PATH)[:10] != DATA[:10]


def test_obstore_if_none_match(server: HostileServer) -> None:
    store = store_of(server)

    async def conditional(tag: str) -> bytes:
        result = await obstore.get_async(store, PATH, options={"if_none_match": tag})
        return bytes(await result.bytes_async())

    # The current ETag: NotModifiedError (the 304); another: the object.
    with pytest.raises(NotModifiedError, match="304 Not Modified"):
        run(conditional(server.etag(PATH)))
    assert run(conditional('"other"')) == DATA


def test_obstore_stall(server: HostileServer) -> None:
    server.fault(Fault.STALL)
    store = store_of(server, timeout=timedelta(seconds=0.5))
    # No answer: each attempt times out (client "timeout"), is retried on a new
    # connection, and after max_retries a GenericError says so: 3 requests, ~1.5 s.
    began = time.monotonic()
    with pytest.raises(GenericError, match="after 2 retries, max_retries: 2") as e:
        run(get_range(store, 1000, 2000))
    assert "Timeout" in str(e.value)
    assert 1.4 < time.monotonic() - began < 5
    assert server.requests == [("GET", PATH, "bytes=1000-1999")] * 3
    assert server.connections == 3


def test_obstore_stall_once(server: HostileServer) -> None:
    server.fault(Fault.STALL, count=1)
    store = store_of(server, timeout=timedelta(seconds=0.5))
    # One stalled attempt costs the timeout; the retry answers.
    assert run(get_range(store, 1000, 2000)) == DATA[1000:2000]
    assert server.gets() == 2 and server.connections == 2
