"""Where a peer's VM comes from: the sources of its resources, and the lazy devices
over them.

Each resource comes from the server named for it (``--RESOURCE-raddr``), the rest
from ``--raddr``; there is one connection per distinct server. A server without a
``state`` resource is a running peer: the VM migrates from it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from drafter.checkpoint.source import CheckpointSource
from drafter.chunkcache import ChunkCache, Filling
from drafter.chunks import DEVICES, FETCHED, TRACKED, ZERO_HASH, ChunkSource
from drafter.device import Device
from drafter.errors import DrafterError
from drafter.hashes import file_hashes
from drafter.index import index_key
from drafter.objects import ObjectSource, StoreOptions, is_object_url
from drafter.package import MAX_STATE_SIZE, PackageConfig, open_package
from drafter.peer.options import PeerOptions
from drafter.transport.client import RemoteSource

# A registry or peer over the wire, a package object, or a checkpoint generation.
Source = RemoteSource | ObjectSource | CheckpointSource

log = logging.getLogger(__name__)


@dataclass
class Sources:
    """The servers of one VM's resources (not connected until :meth:`connect`)."""

    addrs: dict[str, str]  # resource -> HOST:PORT of its server, or its object's URL
    connections: dict[str, Source]  # HOST:PORT or URL -> the one source of it
    cache: ChunkCache | None = None  # the host's chunk cache (--chunk-cache)

    @classmethod
    def open(cls, options: PeerOptions, generation: CheckpointSource | None = None) -> Sources:
        """The sources ``options`` name; ``generation``: every resource from that
        checkpoint generation instead (a VM recovered from its checkpoints)."""
        if generation is not None:
            if options.raddrs:
                raise DrafterError("a VM resumed from its checkpoints takes every resource "
                                   "from them: leave the --RESOURCE-raddr flags out")  # fmt: skip
            addrs = dict.fromkeys(FETCHED, options.raddr)
            return cls(addrs, {options.raddr: generation})
        addrs = {name: options.raddrs.get(name) or options.raddr for name in FETCHED}
        connections: dict[str, Source] = {}
        cache = ChunkCache(options.chunk_cache) if options.chunk_cache is not None else None
        for addr in dict.fromkeys(addrs.values()):
            if is_object_url(addr):
                store = StoreOptions(
                    retry_timeout=options.retry_timeout,
                    tls_ca=options.tls_ca,
                    virtual_hosted=options.s3_virtual_hosted,
                )
                key = index_key(options.token) if options.token else None
                connections[addr] = ObjectSource(
                    addr, key=key, pin=options.index_pin, options=store, cache=cache
                )
            else:
                connections[addr] = RemoteSource(
                    addr,
                    token=options.token,
                    tls_ca=options.tls_ca,
                    retry_timeout=options.retry_timeout,
                    compress=options.compress,
                )
        return cls(addrs, connections, cache)

    @property
    def all(self) -> list[Source]:
        return list(self.connections.values())

    def of(self, resource: str) -> Source:
        """The server of ``resource``."""
        return self.connections[self.addrs[resource]]

    @property
    def config(self) -> bytes:
        """The VM's package config, as its memory's source gave it."""
        return self.of("memory").config

    @property
    def control(self) -> RemoteSource:
        """The memory's server: a migration's control calls go there."""
        source = self.of("memory")
        if not isinstance(source, RemoteSource):
            raise DrafterError(f"{self.addrs['memory']} is an object: nothing migrates from it")
        return source

    @property
    def at_rest(self) -> bool:
        """Whether the VM is a package at rest (a registry offers its ``state``), not a
        running peer's VM (a migration: its state exists only at switch-over)."""
        return "state" in self.of("state").manifest

    def keep_trying(self) -> None:
        """The VM runs: from now on a store outage stalls its fetches (the VM runs on
        the chunks it has) rather than failing them."""
        for source in self.all:
            if isinstance(source, ObjectSource | CheckpointSource):
                source.keep_trying = True

    async def connect(self) -> None:
        """Connect to every server (device loop); DrafterError if one cannot be had."""
        await asyncio.gather(*(s.connect() for s in self.all))

    async def close(self) -> None:
        """Let go of every server (device loop)."""
        await asyncio.gather(*(s.close() for s in self.all))

    def check(self) -> PackageConfig:
        """After :meth:`connect`: the servers serve one VM, whole; its config."""
        if any(s.config != self.config for s in self.all):
            raise DrafterError("the servers given for the resources serve different VMs")
        config = PackageConfig.from_json(self.config, self.addrs["memory"])
        for name in DEVICES:
            if name not in self.of(name).manifest:
                raise DrafterError(f"{self.addrs[name]} does not offer the {name} resource")
        if not self.at_rest and len({self.addrs[n] for n in DEVICES}) > 1:
            raise DrafterError("a migration takes every resource from one peer: give one --raddr")
        if self.size("memory") != config.memory_mib << 20:
            raise DrafterError(f"{self.addrs['memory']}: memory size differs from its config")
        if self.at_rest and self.size("state") > MAX_STATE_SIZE:
            raise DrafterError(
                f"{self.addrs['state']}: a state of {self.size('state')} bytes is absurd"
            )
        return config

    def size(self, resource: str) -> int:
        return self.of(resource).manifest[resource]

    def device(self, name: str, overlay: Path) -> Device:
        """A lazy device of resource ``name``: its chunks come from its server, each
        checked against the hash the server listed (for a running VM's tracked
        devices the list only says what is zero: their chunks change after hashing)."""
        source = self.of(name)
        fetch: ChunkSource = source
        if self.cache is not None and isinstance(source, RemoteSource):
            fetch = Filling(source, self.cache)  # an object source keeps its cache itself
        device = Device(
            name,
            self.size(name),
            None,
            overlay,
            writable=name in TRACKED,
            chunk_size=source.chunk_size,
            source=fetch,
        )
        device.expect(source.hashes[name], binding=self.at_rest or name not in TRACKED)
        return device


def take_local_chunks(devices: dict[str, Device], path: Path) -> int:
    """Chunks of a local package whose hashes match the remote's: copied, not moved.
    Returns the bytes taken."""
    package = open_package(path)
    taken = 0
    fd = os.open(package.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for name, device in devices.items():
            member = package.members.get(name)
            if member is None or member.size != device.size:
                continue
            local = file_hashes(fd, member.offset, member.size, device.chunk_size)
            for index, (mine, theirs) in enumerate(zip(local, device.hashes, strict=True)):
                if mine == theirs and mine != ZERO_HASH and not device.local[index]:
                    length = device.chunk_length(index)
                    start = index * device.chunk_size
                    device.fill(index, os.pread(fd, length, member.offset + start), mine)
                    taken += length
    finally:
        os.close(fd)
    log.info("took %d MiB from %s instead of moving them", taken >> 20, path)
    return taken
