"""``python -m tests.support.control_plane_child --admin-addr … --http-addr … --data-dir …``: one
control plane in this process until SIGTERM, configured like ``spauth control-plane`` (flags, then
``SPAUTH_*`` variables such as ``SPAUTH_DATABASE_URL``). A stand-in for that command in the
scale-out fault tests; the operator key, when this replica mints it, goes to
``<data-dir>/bootstrap-key``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from sidecar import logs
from sidecar.config import load_settings
from sidecar.controlplane import ControlPlane


async def main(args: argparse.Namespace) -> None:
    settings = load_settings(
        {
            "admin_addr": args.admin_addr,
            "http_addr": args.http_addr,
            "data_dir": args.data_dir,
            "database_url": args.database_url,
        }
    )
    logs.configure(settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(settings)
    minted = plane.bootstrap()
    if minted is not None:
        fd = os.open(
            settings.data_dir / "bootstrap-key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
        with os.fdopen(fd, "w") as fh:
            fh.write(minted.secret + "\n")
    await plane.start()
    print(f"ready admin_port={plane.admin_port} http_port={plane.http.port}", flush=True)
    await stop.wait()
    await plane.aclose(grace=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag in ("--admin-addr", "--http-addr", "--data-dir", "--database-url"):
        parser.add_argument(flag)
    asyncio.run(main(parser.parse_args()))
