"""--max-flows bounds the flows of every relay together: each holds a host fd, and the
sandbox's fd limit is --max-flows plus a margin. A flood sweep found each relay checking
only its own table, so one protocol could take every fd (19,936 UDP flows, then TCP
refused with EMFILE) and --max-flows 200 let 200 UDP and 200 TCP flows open at once."""

from __future__ import annotations

import socket

from tests.unit.netframes import DNS, GATEWAY, Harness, guest_udp_frame
from tests.unit.test_destinations import syn_frame, tcp_answers
from tests.unit.test_dns import query, upstream
from voidbox.net.config import NatConfig
from voidbox.net.tcp import RST


def test_max_flows_bounds_every_relay_together():
    silent_dns = upstream()  # never answers: a query stays pending, holding its socket
    datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagrams.bind(("127.0.0.1", 0))
    listener = socket.create_server(("127.0.0.1", 0))
    uport, tport = datagrams.getsockname()[1], listener.getsockname()[1]
    h = Harness(NatConfig(max_flows=3, dns_upstreams=[silent_dns.getsockname()]))
    try:
        h.send(guest_udp_frame(GATEWAY, 1001, uport, b"a"))
        h.send(guest_udp_frame(GATEWAY, 1002, uport, b"b"))
        h.send(guest_udp_frame(DNS, 33333, 53, query()))
        assert h.engine.flow_count() == 3

        # Full: a connection gets a RST at once, a datagram and a query go nowhere.
        h.send(syn_frame(GATEWAY, tport))
        [(_ip, seg)] = tcp_answers(h)
        assert seg.flags & RST
        assert h.engine.tcp.counters["tcp_flow_limit"] == 1
        h.send(guest_udp_frame(GATEWAY, 1003, uport, b"c"))
        assert h.engine.counters["udp_dropped_flow_limit"] == 1
        h.send(guest_udp_frame(DNS, 33334, 53, query()))
        assert h.engine.counters["dns_dropped_flow_limit"] == 1
        assert h.engine.flow_count() == 3

        # A UDP flow gone, the connection opens.
        udp = h.engine.udp
        udp._close_flow(next(iter(udp.flows.values())))
        h.send(syn_frame(GATEWAY, tport))
        assert h.engine.tcp.flow_count() == 1
        assert h.engine.tcp.counters["tcp_flow_limit"] == 1
    finally:
        h.close()
        silent_dns.close()
        datagrams.close()
        listener.close()
