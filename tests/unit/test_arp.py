"""ARP (voidbox/net/arp.py and the engine's use of it)."""

import pytest

from tests.unit.netframes import DNS, GATEWAY, GATEWAY_HW, GUEST, GUEST_HW, Harness
from voidbox.net.packets import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    ETH_BROADCAST,
    ETH_P_ARP,
    build_arp,
    build_ethernet,
)

OTHER_HW = bytes.fromhex("020000000099")


def request(tpa: bytes, spa: bytes = GUEST, sha: bytes = GUEST_HW, op: int = ARPOP_REQUEST) -> bytes:
    return build_ethernet(ETH_BROADCAST, sha, ETH_P_ARP, build_arp(op, sha, spa, b"\x00" * 6, tpa))


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


@pytest.mark.parametrize("target", [GATEWAY, DNS])
def test_answers_gateway_and_dns_golden(h, target):
    h.send(request(target))
    assert h.out == [
        GUEST_HW + GATEWAY_HW + b"\x08\x06"
        + b"\x00\x01\x08\x00\x06\x04\x00\x02" + GATEWAY_HW + target + GUEST_HW + GUEST
    ]


@pytest.mark.parametrize("target", [GUEST, bytes([10, 0, 2, 99]), bytes([192, 168, 1, 1])])
def test_never_answers_the_guest_or_arbitrary_addresses(h, target):
    h.send(request(target))
    assert h.out == []
    # A duplicate-address probe (sender 0.0.0.0) for the guest's address stays unanswered.
    h.send(request(GUEST, spa=b"\x00" * 4))
    assert h.out == []


def test_replies_are_not_answered(h):
    h.send(request(GATEWAY, op=ARPOP_REPLY))
    assert h.out == []


def test_learns_the_guest_mac(h):
    h.send(request(GATEWAY, sha=OTHER_HW))
    assert h.out[0][:6] == OTHER_HW
    assert h.engine.guest_mac == OTHER_HW
    # Only from the guest's own address: someone else's ARP does not redirect its traffic.
    h.send(request(DNS, spa=bytes([10, 0, 2, 50]), sha=GUEST_HW))
    assert h.engine.guest_mac == OTHER_HW


def test_malformed_arp_is_counted(h):
    h.send(build_ethernet(ETH_BROADCAST, GUEST_HW, ETH_P_ARP, b"\x00\x01"))
    assert h.out == [] and h.engine.counters["arp_short"] == 1
