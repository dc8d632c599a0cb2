"""Operability: metrics, health, denial logs, tracing, TLS and the configuration file."""
