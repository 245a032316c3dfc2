"""The daemon's plan of namespaces and addresses (drafter.network.config), and the
configurations it refuses. The daemon itself: tests/vm/test_network.py."""

from __future__ import annotations

import pytest

from drafter.errors import DrafterError
from drafter.network import NetworkConfig
from drafter.network.config import plan_namespaces


def test_plan_addresses() -> None:
    cfg = NetworkConfig(namespace_count=3)
    plans = plan_namespaces(cfg)
    assert [p.namespace for p in plans] == ["ark0", "ark1", "ark2"]
    assert [(p.host_address, p.namespace_address) for p in plans] == [
        ("10.0.8.1", "10.0.8.2"),
        ("10.0.8.5", "10.0.8.6"),
        ("10.0.8.9", "10.0.8.10"),
    ]
    assert [p.external_address for p in plans] == ["10.0.15.1", "10.0.15.2", "10.0.15.3"]
    assert all(len(p.host_veth) <= 15 for p in plans)
    long = plan_namespaces(NetworkConfig(namespace_prefix="a" * 30, namespace_count=2))
    assert len({p.host_veth for p in long}) == 2
    assert all(len(p.host_veth) <= 15 for p in long)


@pytest.mark.parametrize(
    ("cfg", "word"),
    [
        (NetworkConfig(namespace_prefix="bad/name"), "prefix"),
        (NetworkConfig(namespace_count=0), "count"),
        (NetworkConfig(host_veth_cidr="10.0.8.0/29", namespace_count=3), "room"),
        (NetworkConfig(namespace_veth_cidr="nonsense"), "namespace veth CIDR"),
        (NetworkConfig(namespace_interface_mac="zz"), "MAC"),
        (NetworkConfig(namespace_veth_cidr="10.0.8.0/24"), "overlaps"),
    ],
)
def test_config_errors(cfg: NetworkConfig, word: str) -> None:
    with pytest.raises(DrafterError, match=word):
        plan_namespaces(cfg)
