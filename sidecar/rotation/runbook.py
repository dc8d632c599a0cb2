"""The rotation runbook, step by step, through the admin API (``AdminClient``): every step is
saved to the state file before the next one starts, and audited (``key.replaced`` and
``key.revoked`` by the calls themselves, the steps in between by RecordApiKeyRotationStep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2 as pb
from sidecar._gen.statuspulse.auth.v1 import api_keys_pb2_grpc as pb_grpc
from sidecar.cli.client import AdminClient, CliError
from sidecar.rotation.state import RotationState
from sidecar.rotation.targets import Target, TargetError


@dataclass(frozen=True, slots=True)
class Timing:
    """``grace``: the longest wait for the old key to fall silent before revoking it anyway;
    ``settle``: how long the old key must have gone unused (after the new secret was written)
    to count as no longer used — longer than the sidecars' usage_report_interval plus the time
    clients take to pick up the new secret; ``poll``: how often to look."""

    grace: float = 24 * 3600
    settle: float = 15 * 60
    poll: float = 30.0


class Runbook:
    """One rotation of ``key_id`` to ``target``; ``run()`` is resumable."""

    def __init__(
        self,
        client: AdminClient,
        target: Target,
        state_path: Path,
        timing: Timing,
        *,
        progress: Callable[[str], None],
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._stub = pb_grpc.ApiKeyServiceStub(client.channel)
        self._target = target
        self._path = state_path
        self._timing = timing
        self._say = progress
        self._clock = clock
        self._sleep = sleep
        self._secret = ""  # the new secret, only in memory and only in the run that minted it

    def run(self, key_id: str) -> str:
        """Rotate; returns the new key's id."""
        state = RotationState.load(self._path, key_id, self._target.spec)
        if state.step == "new":
            self._record(state, "started")
            self._create(state)
        if state.step == "created":
            self._write(state)
        if state.step == "written":
            self._verify(state)
        self._wait(state)
        self._revoke_old(state)
        return state.new_key_id

    # -- steps ------------------------------------------------------------------------------

    def _create(self, state: RotationState) -> None:
        resp = self._client.call(
            self._stub.CreateReplacementApiKey, pb.CreateReplacementApiKeyRequest(id=state.key_id)
        )
        self._secret = resp.key
        state.new_key_id = resp.api_key.id
        self._advance(state, "created", f"created {resp.api_key.id} (…{resp.api_key.last_four})")

    def _write(self, state: RotationState) -> None:
        if not self._secret:
            # Interrupted before the secret was stored: it is lost (never saved). Replace the
            # unused replacement and revoke it, so no key whose secret nobody has stays valid.
            abandoned = state.new_key_id
            resp = self._client.call(
                self._stub.CreateReplacementApiKey, pb.CreateReplacementApiKeyRequest(id=abandoned)
            )
            self._secret, state.new_key_id = resp.key, resp.api_key.id
            state.abandoned.append(abandoned)
            self._revoke(abandoned, "rotation interrupted before its secret was stored")
            self._advance(state, "created", f"re-created {state.new_key_id}; revoked {abandoned}")
        try:
            self._target.write(self._secret)
        except TargetError as exc:
            self._record(state, "failed", str(exc)[:500])
            raise CliError(f"writing the new secret to {self._target.spec} failed: {exc}") from None
        state.written_at = self._clock()
        self._advance(state, "written", f"wrote the new secret to {self._target.spec}")
        self._record(state, "secret_written")

    def _verify(self, state: RotationState) -> None:
        try:
            stored = self._target.read()
        except TargetError as exc:
            raise CliError(f"reading back {self._target.spec} failed: {exc}") from None
        secret = stored if stored is not None else self._secret
        if not secret:
            # A write-only target, resumed after the write: what it holds cannot be checked.
            state.step = "created"
            self._write(state)
            secret = self._secret
        problem = self._authenticates(secret, state.new_key_id)
        if problem:
            self._record(state, "failed", problem)
            raise CliError(f"verification failed: {problem}; the old key stays valid")
        self._advance(state, "verified", "the stored secret authenticates as " + state.new_key_id)
        self._record(state, "verified")

    def _authenticates(self, secret: str, new_key_id: str) -> str:
        """'' when ``secret`` authenticates as ``new_key_id`` through the admin API's WhoAmI
        (any active key may call it), else why not."""
        try:
            resp = self._stub.WhoAmI(
                pb.WhoAmIRequest(),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=self._client.timeout,
            )
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        if resp.api_key.id != new_key_id:
            return f"the stored secret is another key ({resp.api_key.id})"
        return ""

    def _wait(self, state: RotationState) -> None:
        timing = self._timing
        while True:
            now = self._clock()
            old = self._get(state.key_id)
            last_use = old.last_use_time.seconds if old.HasField("last_use_time") else 0
            quiet_since = max(state.written_at, float(last_use))
            if now - quiet_since >= timing.settle:
                self._say(f"the old key has not been used for {int(now - quiet_since)}s")
                self._record(state, "old_key_unused")
                return
            if now - state.written_at >= timing.grace:
                self._say("grace period over; the old key is still in use, revoking it anyway")
                self._record(state, "grace_ended", f"last used at {last_use}")
                return
            used = f"last used {int(now - last_use)}s ago" if last_use else "never used"
            self._say(f"waiting: the old key was {used}; need {int(timing.settle)}s unused")
            self._sleep(timing.poll)

    def _revoke_old(self, state: RotationState) -> None:
        self._revoke(state.key_id, f"rotated to {state.new_key_id}")
        self._record(state, "completed")
        self._say(f"revoked {state.key_id}; {state.new_key_id} is in use")
        self._path.unlink(missing_ok=True)

    # -- helpers ----------------------------------------------------------------------------

    def _get(self, key_id: str) -> pb.ApiKey:
        resp: pb.GetApiKeyResponse = self._client.call(
            self._stub.GetApiKey, pb.GetApiKeyRequest(id=key_id)
        )
        return resp.api_key

    def _revoke(self, key_id: str, reason: str) -> None:
        self._client.call(self._stub.RevokeApiKey, pb.RevokeApiKeyRequest(id=key_id, reason=reason))

    def _advance(self, state: RotationState, step: str, message: str) -> None:
        state.step = step
        state.save(self._path)
        self._say(message)

    def _record(self, state: RotationState, step: str, detail: str = "") -> None:
        self._client.call(
            self._stub.RecordApiKeyRotationStep,
            pb.RecordApiKeyRotationStepRequest(
                id=state.key_id, step=step, target=self._target.spec, detail=detail
            ),
        )
