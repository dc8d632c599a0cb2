"""The web console at ``/console``: server-rendered pages over the admin API's use cases."""

from sidecar.http.console.routes import ConsoleServices, console_routes
from sidecar.http.console.sessions import SessionPolicy

__all__ = ["ConsoleServices", "SessionPolicy", "console_routes"]
