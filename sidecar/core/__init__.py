"""The domain: credentials, scopes, policy, decisions. Imports no transport or storage driver."""
