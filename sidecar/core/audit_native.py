"""The compiled audit ingest step (sidecar/core/_auditchain.c) as an optional extension: one
IngestAuditRecordsRequest's bytes to a ``PreparedBatch`` without a protobuf object or an
``AuditEvent`` per record, and its rows linked and hashed in C. Built where a C compiler and
the Python headers exist (setup.py); without it, or for a message it does not reproduce
exactly (``parse`` returns None), ingest takes the Python path (``audit_batch.EventBatch``,
the reference), with the same result."""

from __future__ import annotations

import itertools
import logging
from collections.abc import MutableMapping, Sequence
from typing import Any

from sidecar.core.audit_batch import CHECKS, Refusal, Row
from sidecar.core.native import optional_module

log = logging.getLogger("sidecar.audit")

_native, _IMPORT_ERROR = optional_module("sidecar.core._auditchain")
_logged = False


def unavailable() -> str:
    """Why the compiled step cannot run here ('' when it can)."""
    return _IMPORT_ERROR


class NativeBatch:
    """A PreparedBatch made by the compiled step."""

    def __init__(self, parsed: tuple[bool, int, list[Any], list[Any], dict[int, Any]]) -> None:
        report_refused, size, refused, accepted, records = parsed
        self.size: int = size
        self.report_refused: bool = report_refused
        self.refused = [
            Refusal(rid, CHECKS[code - 1][1], CHECKS[code - 1][2], CHECKS[code - 1][0], index)
            for index, code, rid in refused
        ]
        self.accepted: list[tuple[int, str]] = accepted
        # index -> (row without its link, canonical form with NULs where the link goes)
        self._records: dict[int, tuple[tuple[Any, ...], bytes]] = records

    def content(self, index: int) -> bytes:
        before, middle, after = self._records[index][1].split(b"\0")
        return before + b"0" + middle + b'""' + after

    def workspace(self, index: int) -> str:
        return str(self._records[index][0][4])

    def workspaces(self, indices: Sequence[int]) -> list[str]:
        records = self._records
        return list(dict.fromkeys([records[i][0][4] for i in indices]))

    def rows(self, indices: Sequence[int], heads: MutableMapping[str, Any]) -> list[Row]:
        records = self._records
        linked = dict(heads)
        rows: list[Row] = _native.link([records[i] for i in indices], linked)
        heads.update(linked)
        return rows


def copy_text(rows: list[Row]) -> bytes | None:
    """``rows`` as one PostgreSQL ``COPY ... FROM STDIN`` text payload (what psycopg's
    ``write_row`` sends row by row, at a fraction of its per-row cost); None without the
    compiled step or when a value is not one it writes (a NUL: psycopg then refuses it)."""
    return None if _native is None else _native.copy_text(rows)


def flat(rows: list[Row], size: int) -> list[tuple[Any, ...]]:
    """``rows`` as the parameters of ``size``-row INSERT statements (``len(rows)`` a multiple of
    ``size``): each tuple the values of ``size`` consecutive rows, in order."""
    if _native is not None:
        params: list[tuple[Any, ...]] = _native.flat(rows, size)
        return params
    chain = itertools.chain.from_iterable
    return [tuple(chain(rows[at : at + size])) for at in range(0, len(rows), size)]


def parse(data: bytes, latest: float) -> NativeBatch | None:
    """The message's batch, or None when the compiled step is unavailable (logged once) or
    does not reproduce this message (the caller then takes the Python path)."""
    global _logged
    if _native is None:
        if not _logged:
            _logged = True
            log.warning(
                "audit ingest: compiled step unavailable, using the Python path",
                extra={"error": _IMPORT_ERROR},
            )
        return None
    parsed = _native.parse(data, latest)
    return None if parsed is None else NativeBatch(parsed)
