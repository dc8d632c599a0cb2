"""The state file of one rotation, so an interrupted ``spauth keys rotate`` resumes where it
stopped. It holds ids, the target spec, the step reached and times, never a secret (mode 0600
all the same), and is replaced atomically at every step; a finished rotation deletes it."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Steps in order. "created": the replacement exists but its secret may not have reached the
# target (it is not in the state file, so a resumed run re-mints); "written": the target holds
# it; "verified": the stored secret authenticates; then the old key is revoked and the file goes.
STEPS = ("new", "created", "written", "verified")


class StateError(Exception):
    """The state file is unreadable, or belongs to another rotation."""


@dataclass
class RotationState:
    key_id: str
    target: str
    step: str = "new"
    new_key_id: str = ""
    written_at: float = 0.0
    # Replacements minted by an interrupted run whose secret never reached the target; revoked.
    abandoned: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, key_id: str, target: str) -> RotationState:
        """The saved state of this rotation, or a fresh one when there is no file."""
        try:
            raw = json.loads(path.read_text())
            state = cls(**raw)
        except FileNotFoundError:
            return cls(key_id, target)
        except (OSError, ValueError, TypeError) as exc:
            raise StateError(f"unreadable state file {path}: {exc}") from None
        if state.key_id != key_id or state.target != target:
            raise StateError(
                f"{path} belongs to the rotation of {state.key_id} to {state.target!r}: finish "
                "that one (same arguments) or pass another --state-file"
            )
        if state.step not in STEPS:
            raise StateError(f"{path}: unknown step {state.step!r}")
        return state

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
