"""A small stand-in for Mojang's ``server.jar`` (not reachable from these machines),
written as class-file bytes so the tests need no JDK on the host.

What it does, in Java::

    public class DrafterStandIn {
        public static void main(String[] args) throws Exception {
            ServerSocket server = new ServerSocket(Integer.getInteger("drafter.port", 25565),
                50, InetAddress.getByName(System.getProperty("drafter.host", "0.0.0.0")));
            int n = 0;
            while (true) {
                n++;
                Socket c = server.accept();
                try {
                    OutputStream out = c.getOutputStream();
                    out.write(GREETING.getBytes());
                    out.write(String.valueOf(n).getBytes());
                    out.write('\\n');
                    c.close();
                } catch (Throwable e) {
                    // a client that left early (a liveness probe): serve the next one
                }
            }
        }
    }

It answers every connection with ``GREETING`` and the number of connections it has
accepted since it started: a count that goes on after a resume shows the process
(its memory) survived the snapshot, where a reboot would start again at 1. Class-file
version 49 (Java 5), which needs no stack map frames and which Java 17 still runs.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

GREETING = "drafter stand-in for server.jar, connection "
CLASS = "DrafterStandIn"
PORT_PROPERTY = "drafter.port"
DEFAULT_PORT = 25565
HOST_PROPERTY = "drafter.host"  # the address it listens on (default: every address)
DEFAULT_HOST = "0.0.0.0"


class _Pool:
    """A class file's constant pool, entries made once each."""

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.index: dict[tuple[object, ...], int] = {}

    def _add(self, key: tuple[object, ...], body: bytes) -> int:
        if key not in self.index:
            self.entries.append(body)
            self.index[key] = len(self.entries)
        return self.index[key]

    def utf8(self, text: str) -> int:
        data = text.encode()
        return self._add(("utf8", text), struct.pack(">BH", 1, len(data)) + data)

    def cls(self, name: str) -> int:
        return self._add(("class", name), struct.pack(">BH", 7, self.utf8(name)))

    def string(self, text: str) -> int:
        return self._add(("string", text), struct.pack(">BH", 8, self.utf8(text)))

    def method(self, owner: str, name: str, descriptor: str) -> int:
        nat = self._add(
            ("nat", name, descriptor),
            struct.pack(">BHH", 12, self.utf8(name), self.utf8(descriptor)),
        )
        return self._add(
            ("method", owner, name, descriptor), struct.pack(">BHH", 10, self.cls(owner), nat)
        )

    def body(self) -> bytes:
        return struct.pack(">H", len(self.entries) + 1) + b"".join(self.entries)


def class_bytes() -> bytes:
    """The class file of ``DrafterStandIn``."""
    pool = _Pool()
    this, parent = pool.cls(CLASS), pool.cls("java/lang/Object")
    server_socket = pool.cls("java/net/ServerSocket")
    init = pool.method("java/net/ServerSocket", "<init>", "(IILjava/net/InetAddress;)V")
    get_property = pool.method(
        "java/lang/System",
        "getProperty",
        "(Ljava/lang/String;Ljava/lang/String;)Ljava/lang/String;",
    )
    by_name = pool.method(
        "java/net/InetAddress", "getByName", "(Ljava/lang/String;)Ljava/net/InetAddress;"
    )
    get_integer = pool.method(
        "java/lang/Integer", "getInteger", "(Ljava/lang/String;I)Ljava/lang/Integer;"
    )
    int_value = pool.method("java/lang/Integer", "intValue", "()I")
    accept = pool.method("java/net/ServerSocket", "accept", "()Ljava/net/Socket;")
    output = pool.method("java/net/Socket", "getOutputStream", "()Ljava/io/OutputStream;")
    close = pool.method("java/net/Socket", "close", "()V")
    get_bytes = pool.method("java/lang/String", "getBytes", "()[B")
    value_of = pool.method("java/lang/String", "valueOf", "(I)Ljava/lang/String;")
    write_bytes = pool.method("java/io/OutputStream", "write", "([B)V")
    write_byte = pool.method("java/io/OutputStream", "write", "(I)V")
    greeting, port_property = pool.string(GREETING), pool.string(PORT_PROPERTY)
    host_property, default_host = pool.string(HOST_PROPERTY), pool.string(DEFAULT_HOST)
    assert max(greeting, port_property, host_property, default_host) < 256  # ldc: one byte

    def u2(opcode: int, index: int) -> bytes:
        return struct.pack(">BH", opcode, index)

    new, dup, ldc, sipush, invokespecial, invokevirtual, invokestatic = (
        0xBB, 0x59, 0x12, 0x11, 0xB7, 0xB6, 0xB8,
    )  # fmt: skip
    head = (
        u2(new, server_socket) + bytes([dup])
        + bytes([ldc, port_property]) + struct.pack(">BH", sipush, DEFAULT_PORT)
        + u2(invokestatic, get_integer) + u2(invokevirtual, int_value)
        + bytes([0x10, 50])  # bipush 50: the backlog
        + bytes([ldc, host_property, ldc, default_host]) + u2(invokestatic, get_property)
        + u2(invokestatic, by_name)
        + u2(invokespecial, init)
        + bytes([0x4C, 0x03, 0x3D])  # astore_1 (the server), iconst_0, istore_2 (n)
    )  # fmt: skip
    accepting = (
        bytes([0x84, 2, 1])  # iinc n, 1
        + bytes([0x2B]) + u2(invokevirtual, accept) + bytes([0x4E])  # aload_1 .. astore_3
    )  # fmt: skip
    serving = (
        bytes([0x2D]) + u2(invokevirtual, output)  # aload_3: the socket's stream
        + bytes([dup, ldc, greeting]) + u2(invokevirtual, get_bytes)
        + u2(invokevirtual, write_bytes)
        + bytes([dup, 0x1C]) + u2(invokestatic, value_of)  # iload_2: n
        + u2(invokevirtual, get_bytes) + u2(invokevirtual, write_bytes)
        + bytes([0x10, 0x0A]) + u2(invokevirtual, write_byte)  # bipush '\n'
        + bytes([0x2D]) + u2(invokevirtual, close)
    )  # fmt: skip
    # The loop: accept, serve (a client that left early makes a write throw: caught,
    # the exception dropped), again.
    loop_start = len(head)
    try_start = loop_start + len(accepting)
    try_end = try_start + len(serving)
    code = head + accepting + serving + struct.pack(">Bh", 0xA7, loop_start - try_end)
    handler = len(code)
    code += bytes([0x57]) + struct.pack(">Bh", 0xA7, loop_start - (handler + 1))  # pop; goto
    code_attribute = (
        struct.pack(">HHI", 6, 4, len(code)) + code  # max_stack, max_locals, code
        + struct.pack(">HHHHH", 1, try_start, try_end, handler, 0)  # catch anything
        + struct.pack(">H", 0)  # no attributes
    )  # fmt: skip
    code_name, main_name = pool.utf8("Code"), pool.utf8("main")
    main_descriptor = pool.utf8("([Ljava/lang/String;)V")
    method = (
        struct.pack(">HHHH", 0x0009, main_name, main_descriptor, 1)  # public static
        + struct.pack(">HI", code_name, len(code_attribute)) + code_attribute
    )  # fmt: skip
    return (
        struct.pack(">IHH", 0xCAFEBABE, 0, 49) + pool.body()
        + struct.pack(">HHHHHH", 0x0021, this, parent, 0, 0, 1)  # public super; 1 method
        + method + struct.pack(">H", 0)
    )  # fmt: skip


def write_jar(path: Path) -> Path:
    """``path``: a runnable jar of the stand-in (``java -jar path``), the same bytes
    every time (so a blueprint that adds it is cached)."""
    stamp = (2024, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(path, "w") as jar:
        manifest = f"Manifest-Version: 1.0\r\nMain-Class: {CLASS}\r\n\r\n"
        jar.writestr(zipfile.ZipInfo("META-INF/MANIFEST.MF", stamp), manifest)
        jar.writestr(zipfile.ZipInfo(f"{CLASS}.class", stamp), class_bytes())
    return path
