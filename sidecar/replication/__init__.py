"""Replication: how credential state travels from the control plane's change log to every
sidecar's in-memory replica. ``server`` streams a snapshot then ordered changes (admin gRPC),
``client`` follows that stream in the sidecar, ``bus`` wakes the streams of every control-plane
replica through Redis, ``changes`` builds and applies the OAuth change entries, and ``replica``
is the sidecar's lock-free copy read on every check."""
