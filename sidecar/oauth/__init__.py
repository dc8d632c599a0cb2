"""The OAuth 2.0 authorization server, one module per RFC where it fits (authlib-style).

Like ``sidecar.core`` it imports no transport: ``sidecar.http`` parses requests, calls these
modules and renders their answers; errors carry their wire code and HTTP status
(``sidecar.oauth.errors``)."""
