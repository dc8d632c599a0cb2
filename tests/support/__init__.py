"""Helpers for tests that run real processes (Envoy, echo upstream) on loopback."""
