"""The user-mode NAT (slirp backend) and `voidbox net run`.

Layout: packets (wire formats), arp, dhcp, dns, icmp, udp (relays), policy (egress rules
and forward specs), config (NatConfig), loop (epoll), engine (frame dispatch), tap,
netns and run (`voidbox net run`). The TCP relay lives in tcp_nat.
"""
