"""ARP responder for the NAT's own addresses (RFC 826).

Only the gateway and DNS addresses are answered: never the guest's own address (its
duplicate-address probes must go unanswered) nor arbitrary ones. Requests from the guest
teach the NAT the guest's MAC address.
"""

from __future__ import annotations

from voidbox.net.config import NatConfig, parse_mac
from voidbox.net.packets import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    ETH_P_ARP,
    Arp,
    build_arp,
    build_ethernet,
    ip_to_bytes,
)


class ArpResponder:
    def __init__(self, config: NatConfig):
        self.gateway_mac = parse_mac(config.gateway_mac)
        self.guest_ip = ip_to_bytes(config.guest_ip)
        self.answers = {ip_to_bytes(config.gateway_ip), ip_to_bytes(config.dns_ip)}

    def handle(self, arp: Arp) -> tuple[bytes | None, bytes | None]:
        """(reply frame or None, learned guest MAC or None) for one ARP packet."""
        learned = arp.sha if arp.spa == self.guest_ip else None
        if arp.op != ARPOP_REQUEST or arp.tpa not in self.answers:
            return None, learned
        # RFC 826 "Packet Reception": swap the sender and target fields, fill in our address.
        reply = build_arp(ARPOP_REPLY, self.gateway_mac, arp.tpa, arp.sha, arp.spa)
        return build_ethernet(arp.sha, self.gateway_mac, ETH_P_ARP, reply), learned
