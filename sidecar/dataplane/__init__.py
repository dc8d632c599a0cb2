"""The sidecar (data plane): Envoy ext_authz and in-cluster checks from a local replica."""
