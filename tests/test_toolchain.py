"""The toolchain is pinned: constraints.txt names every package we install at one exact version,
and the environment running the tests holds exactly those versions (so code generation and lint
verdicts are the same on every machine; upgrading is a commit of constraints.txt)."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        found = _PIN.match(line.strip())
        assert found, f"constraints.txt: not an exact pin: {line!r}"
        pins[_canonical(found.group(1))] = found.group(2)
    return pins


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    return {_canonical(m.group(0)) for r in requirements if (m := _NAME.match(r))}


def test_every_declared_dependency_is_pinned_exactly() -> None:
    missing = _declared() - set(_pins())
    assert not missing, f"add to pyproject.toml, then `make lock` (README, Development): {missing}"


def test_the_generator_and_the_linters_are_pinned() -> None:
    assert {"grpcio", "grpcio-tools", "protobuf", "ruff", "mypy"} <= set(_pins())


def test_this_environment_holds_the_pinned_versions() -> None:
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (installed[name], pin)
        for name, pin in _pins().items()
        if name in installed and installed[name] != pin
    }
    assert not wrong, f"installed != pinned (run make test, which reinstalls): {wrong}"


def test_no_tracked_symlink_leads_outside_the_repository() -> None:
    """A fresh clone must work alone: a committed symlink to a developer's venv or worktree
    (one was, once: `.venv` -> another worktree's venv) breaks `make serve` on every other
    machine."""
    listing = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for line in listing.splitlines():
        mode, _, _, path = line.split(None, 3)
        if mode == "120000":
            target = (ROOT / path).parent / Path(str((ROOT / path).readlink()))
            assert target.resolve().is_relative_to(ROOT), f"{path} -> {target}"
