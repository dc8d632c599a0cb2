"""A process that owns an audit spool, for the kill -9 test: it records decisions at a steady
pace, ships them when given a control plane, and prints ``accepted written shipped dropped``
after every 50 records until it is killed.

Usage: python -m tests.support.audit_child SPOOL_DIR [TARGET API_KEY]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sidecar.auditship import AuditPipeline, GrpcTransport, ShipConfig, decision_event


def main(argv: list[str]) -> None:
    spool_dir = Path(argv[0])
    transport = GrpcTransport(argv[1], argv[2]) if len(argv) > 2 else None
    pipeline = AuditPipeline(ShipConfig(spool_dir, batch_records=200), transport)
    pipeline.start()
    i = 0
    while True:
        for _ in range(50):
            pipeline.record(
                decision_event(
                    time=time.time(),
                    allowed=i % 5 != 0,
                    reason="ok" if i % 5 else "unknown_key",
                    credential_id="key_child",
                    workspace="acme",
                    method="GET",
                    path="/v1/checks?page=2",
                    source="127.0.0.1:40000",
                    decision_id=f"dec_{i:08d}",
                    latency_s=0.0002,
                )
            )
            i += 1
        stats = pipeline.stats()
        shipped = stats.shipper.shipped if stats.shipper else 0
        print(i, stats.written, shipped, stats.dropped, flush=True)
        time.sleep(0.005)


if __name__ == "__main__":
    main(sys.argv[1:])
