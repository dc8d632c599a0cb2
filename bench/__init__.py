"""Benchmarks for the ext_authz sidecar."""
