"""The decision engine: what a Check answers. ``engine`` decides from a request's credential, the
route ``policy``, the local ``replica`` of credential state and the rate limits (``ratelimit``,
the Protocol the engine consults), returning a ``decision`` value; ``access_tokens`` and
``token_verifier`` check OAuth access tokens against the replicated signing keys;
``policy_source`` loads and hot-reloads the policy file. Like ``sidecar.core`` it imports no
transport."""
