"""The domain: credentials, scopes, records, storage Protocols, use cases. Imports no transport or
storage driver (the decision engine is ``sidecar.authz``)."""
