"""``python -m sidecar`` is the ``spauth`` command."""

from sidecar.cli.main import main

raise SystemExit(main())
