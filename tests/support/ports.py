"""Loopback port helpers; they live in :mod:`sidecar.devtools.ports` so the bench can use them."""

from sidecar.devtools.ports import free_port, free_ports, port_accepts, wait_for_port

__all__ = ["free_port", "free_ports", "port_accepts", "wait_for_port"]
