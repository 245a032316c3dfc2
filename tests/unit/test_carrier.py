"""The carrier watch (drafter.network.carrier) reads a tap's carrier from netlink link
events; here from events made by hand. A real tap: tests/vm/test_follow.py."""

from __future__ import annotations

import struct

from drafter.network import carrier


def test_carrier_is_read_from_the_last_link_event_about_the_tap() -> None:
    def event(index: int, flags: int) -> bytes:
        body = struct.pack("=BxHiII", 0, 1, index, flags, 0)
        return struct.pack("=LHHLL", 16 + len(body), 16, 0, 0, 0) + body

    up, down = 0x10000 | 1, 1
    assert carrier.CarrierWatch._carrier_in(event(5, up), 5) is True
    assert carrier.CarrierWatch._carrier_in(event(5, up) + event(5, down), 5) is False
    assert carrier.CarrierWatch._carrier_in(event(6, down), 5) is None
    assert carrier.CarrierWatch._carrier_in(b"\x00" * 8, 5) is None
