"""drafter-forwarder's ``--port-forwards`` (drafter.network.forwarder): the seed's JSON,
and what is refused. The forwarder carrying traffic: tests/vm/test_network.py."""

from __future__ import annotations

import pytest

from drafter.errors import DrafterError
from drafter.network.forwarder import parse_port_forwards


def test_parse_port_forwards() -> None:
    (f,) = parse_port_forwards(
        '[{"netns":"ark0","internalPort":"6379","protocol":"tcp","externalAddr":"127.0.0.1:3333"}]'
    )
    assert (f.netns, f.internal_port, f.external_host, f.external_port) == (
        "ark0",
        6379,
        "127.0.0.1",
        3333,
    )
    for bad, word in [
        ("{nope", "JSON"),
        ("[]", "non-empty"),
        ('[{"netns":"a","internalPort":"1","protocol":"udp","externalAddr":"1.2.3.4:5"}]', "tcp"),
        ('[{"netns":"a","internalPort":"x","externalAddr":"127.0.0.1:5"}]', "internalPort"),
        ('[{"netns":"a","internalPort":"1","externalAddr":"127.0.0.1"}]', "HOST:PORT"),
    ]:
        with pytest.raises(DrafterError, match=word):
            parse_port_forwards(bad)
