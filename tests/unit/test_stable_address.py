"""Stable addresses (drafter.network.follow) without a network: what is accepted as one,
and the translation rules each namespace gets. With namespaces and VMs:
tests/vm/test_follow.py."""

from __future__ import annotations

import pytest

from drafter.errors import DrafterError
from drafter.network.follow import parse_stable_address, stable_ruleset


@pytest.mark.parametrize(
    ("text", "ok"),
    [("10.0.16.1", True), ("192.0.2.1", True), ("0.0.0.0", False), ("224.0.0.1", False),
     ("169.254.1.1", False), ("255.255.255.255", False), ("10.0.16.1/32", False), ("", False)],
)  # fmt: skip
def test_parse_stable_address(text: str, ok: bool) -> None:
    if ok:
        assert parse_stable_address(text) == text
    else:
        with pytest.raises(DrafterError):
            parse_stable_address(text)


def test_the_stable_translation_is_the_same_in_every_namespace() -> None:
    rules = stable_ruleset("10.0.16.1", "veth0", "172.100.100.2")
    assert (
        'iifname "veth0" ip daddr 10.0.16.1 meta l4proto { tcp, udp } dnat to 172.100.100.2'
        in rules
    )
    assert 'oifname "veth0" ip saddr 172.100.100.2 snat to 10.0.16.1' in rules
    assert "ark" not in rules  # nothing of the namespace it is made in
