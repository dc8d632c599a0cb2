"""Loading and hot-reloading the route policy file. An invalid file is rejected with a message
naming line and problem, and the previous policy stays in force."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from sidecar.authz.policy import Policy, PolicyError, parse_policy

log = logging.getLogger("sidecar.policy")


def default_policy_text() -> str:
    """The packaged StatusPulse API policy (same as deploy/policy/statuspulse-api.toml)."""
    return resources.files("sidecar.authz").joinpath("default_policy.toml").read_text()


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path``, or the packaged default; raises PolicyError when invalid."""
    if path is None:
        return parse_policy(default_policy_text(), "default_policy.toml")
    policy = parse_policy(path.read_text(), str(path))
    if policy.allow_operator_key:
        # An explicit opt-in, said out loud; each of the operator key's decisions is recorded
        # in the operator chain ('*') of the audit trail.
        log.warning(
            "policy lets the operator key through API routes (allow_operator_key = true)",
            extra={"policy": str(path)},
        )
    return policy


class PolicyWatcher:
    """Polls the file's (mtime, size, inode); on change parses it and hands it to ``apply``."""

    def __init__(
        self,
        path: Path | None,
        apply: Callable[[Policy], None],
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._apply = apply
        self._on_result = on_result or (lambda _result: None)
        self._seen = self._stamp()
        self.last_error = ""

    def _stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> bool:
        """Reload if the file changed; True when a new policy took effect."""
        stamp = self._stamp()
        if self.path is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            policy = load_policy(self.path)
        except (PolicyError, OSError) as exc:
            self.last_error = str(exc)
            log.error("policy rejected; keeping the previous one", extra={"error": str(exc)})
            self._on_result("error")
            return False
        self._apply(policy)
        self.last_error = ""
        log.info("policy reloaded", extra={"routes": len(policy.routes), "source": policy.source})
        self._on_result("ok")
        return True
