"""The free-port helper hands out numbers no other bind(0) or client connection can take."""

from __future__ import annotations

import socket

from sidecar.devtools import ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    chosen = ports.free_ports(20)
    assert len(set(chosen)) == 20
    assert all(20000 <= p < ports._ephemeral_start() for p in chosen)
    for port in chosen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
