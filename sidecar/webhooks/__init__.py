"""Webhook delivery, control-plane side: ``sealing`` keeps signing secrets encrypted at rest,
``signing`` builds and checks the signature header, ``delivery`` sends the outbox (at least
once, retried with capped, jittered backoff). Registration and the outbox itself are
``sidecar.core.webhooks``."""
