"""Credential usage, sidecar side: ``UsageTally`` counts uses per API key and OAuth grant on the
RPC threads (one dict increment per check, no lock), ``UsageReporter`` harvests the counts every
``interval`` and reports them to the control plane (``UsageService.ReportUsage``) at least once,
with bounded memory. The control plane's side is ``sidecar.core.usage``."""

from sidecar.usage.reporter import ReporterStats, UsageReporter
from sidecar.usage.tally import UsageTally
from sidecar.usage.transport import GrpcUsageTransport, UsageTransport, UsageTransportError

__all__ = [
    "GrpcUsageTransport",
    "ReporterStats",
    "UsageReporter",
    "UsageTally",
    "UsageTransport",
    "UsageTransportError",
]
