"""Drafter: snapshot, package, run and move stateful microVMs.

The public API is the names below (see docs/api.md for runnable examples); anything
else in the package is internal and may change. They are imported on first use, so
that ``import drafter`` and the commands stay quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "DrafterError": "drafter.errors",
    "Blueprint": "drafter.blueprint.builder",
    "BlueprintSpec": "drafter.blueprint.builder",
    "build": "drafter.blueprint.builder",
    "VMShape": "drafter.vm",
    "LocalVM": "drafter.vm",
    "VMSession": "drafter.session",
    "package_blueprint": "drafter.vm",
    "Timings": "drafter.snapshot",
    "Package": "drafter.package",
    "PackageConfig": "drafter.package",
    "open_package": "drafter.package",
    "Peer": "drafter.peer",
    "PeerOptions": "drafter.peer",
    "PullProgress": "drafter.peer",
    "MigrationSummary": "drafter.peer",
    "ChunkProvider": "drafter.transport.server",
    "ChunkServer": "drafter.transport.server",
    "ServerLimits": "drafter.transport.server",
    "PackageProvider": "drafter.transport.registry",
    "RemoteSource": "drafter.transport.client",
    "VerificationError": "drafter.transport.client",
    "Network": "drafter.network.topology",
    "NetworkConfig": "drafter.network.config",
    "NamespaceInfo": "drafter.network.state",
    "namespace_info": "drafter.network.state",
}

__all__ = [
    "Blueprint",
    "BlueprintSpec",
    "ChunkProvider",
    "ChunkServer",
    "DrafterError",
    "LocalVM",
    "MigrationSummary",
    "NamespaceInfo",
    "Network",
    "NetworkConfig",
    "Package",
    "PackageConfig",
    "PackageProvider",
    "Peer",
    "PeerOptions",
    "PullProgress",
    "RemoteSource",
    "ServerLimits",
    "Timings",
    "VMSession",
    "VMShape",
    "VerificationError",
    "build",
    "namespace_info",
    "open_package",
    "package_blueprint",
]

if TYPE_CHECKING:
    from drafter.blueprint.builder import Blueprint, BlueprintSpec, build
    from drafter.errors import DrafterError
    from drafter.network.config import NetworkConfig
    from drafter.network.state import NamespaceInfo, namespace_info
    from drafter.network.topology import Network
    from drafter.package import Package, PackageConfig, open_package
    from drafter.peer import MigrationSummary, Peer, PeerOptions, PullProgress
    from drafter.session import VMSession
    from drafter.snapshot import Timings
    from drafter.transport.client import RemoteSource, VerificationError
    from drafter.transport.registry import PackageProvider
    from drafter.transport.server import ChunkProvider, ChunkServer, ServerLimits
    from drafter.vm import LocalVM, VMShape, package_blueprint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'drafter' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
