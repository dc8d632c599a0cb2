"""Replication: how credential state travels from the control plane's change log to every
sidecar. ``server`` streams a snapshot then ordered changes (admin gRPC), ``client`` follows that
stream in the sidecar and feeds its replica (``sidecar.authz.replica``), and ``bus`` wakes the
streams of every control-plane replica through Redis. The change entries themselves are built in
the core (``sidecar.core.changes``), where the use cases that commit them live."""
