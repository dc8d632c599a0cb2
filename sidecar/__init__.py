"""StatusPulse Auth: API keys and OAuth 2.0 tokens, issued by a control plane and enforced by an
Envoy ext_authz sidecar."""

__version__ = "0.1.0"
