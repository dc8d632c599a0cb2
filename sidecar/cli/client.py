"""The admin API client: one channel, the caller's key as Bearer metadata, errors as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

T = TypeVar("T")

EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69


# What gRPC's client says when no server answered: refused or timed-out connections, names that
# do not resolve. The admin API's own UNAVAILABLE ("store unavailable…") says none of these.
_UNREACHABLE = ("connect", "deadline", "resolv", "name resolution", "socket closed", "address")


def _never_reached(details: str | None) -> bool:
    text = (details or "").lower()
    return not text or any(marker in text for marker in _UNREACHABLE)


class CliError(Exception):
    """Printed as one line on stderr, then the CLI exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_API_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for an admin port that serves TLS (``ca``) or mTLS (``ca``, ``cert``, ``key``).
    An empty ``ca`` trusts the system's roots."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise CliError("--tls-cert and --tls-key go together (mTLS)", EXIT_USAGE)
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "--tls-ca"),
            private_key=_read(self.key, "--tls-key"),
            certificate_chain=_read(self.cert, "--tls-cert"),
        )


def _read(path: str, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{flag}: cannot read {path}: {exc.strerror}", EXIT_USAGE) from None


class AdminClient:
    """Holds the channel and the metadata every call carries."""

    def __init__(
        self, endpoint: str, api_key: str, timeout: float = 10.0, tls: TlsFiles | None = None
    ) -> None:
        if not api_key:
            raise CliError(
                "STATUSPULSE_API_KEY is not set: export the key to authenticate with "
                "(the operator key is in <data-dir>/bootstrap-key)",
                EXIT_USAGE,
            )
        self.endpoint = endpoint
        self.channel = (
            grpc.insecure_channel(endpoint)
            if tls is None
            else grpc.secure_channel(endpoint, tls.credentials())
        )
        self.metadata = (("authorization", f"Bearer {api_key}"),)
        self.timeout = timeout

    def call(self, method: Callable[..., T], request: object) -> T:
        """Invoke a unary method, turning RPC failures into CliError."""
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    def _translate(self, exc: grpc.RpcError) -> CliError:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
            _never_reached(details)
        ):
            return CliError(
                f"cannot reach the admin API at {self.endpoint} ({code.name.lower()}): "
                "is `spauth serve` running? set --endpoint or SPAUTH_ENDPOINT",
                EXIT_UNAVAILABLE,
            )
        name = code.name if code is not None else "UNKNOWN"
        return CliError(f"{name}: {details}")

    def close(self) -> None:
        self.channel.close()


def tls_files(args: object) -> TlsFiles | None:
    """The ``--tls-*`` options of a command, or None for a plaintext admin port."""
    files = TlsFiles(
        getattr(args, "tls_ca", "") or "",
        getattr(args, "tls_cert", "") or "",
        getattr(args, "tls_key", "") or "",
    )
    return files if (files.ca or files.cert or files.key or getattr(args, "tls", False)) else None


@contextmanager
def admin_client(endpoint: str, api_key: str, tls: TlsFiles | None = None) -> Iterator[AdminClient]:
    client = AdminClient(endpoint, api_key, tls=tls)
    try:
        yield client
    finally:
        client.close()


def fail(message: str, exit_code: int) -> int:
    print(f"spauth: error: {message}", file=sys.stderr)
    return exit_code
