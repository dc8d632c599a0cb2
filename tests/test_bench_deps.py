"""``python -m bench`` runs from its own dependencies, and keeps what it measured if it crashes.

A bench that imports pytest (or anything else only the ``test`` extra installs) crashes where
only ``pip install '.[bench]'`` was run, possibly minutes into a run. The first test imports every
bench module in a fresh interpreter where the test-only packages cannot be imported; which
packages are test-only is read from pyproject.toml (in the ``test`` extra, not in the
dependencies nor the ``bench`` extra), so a new test dependency is covered without editing this.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from bench.targets import RunningTarget, TargetEnv

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child: refuse the blocked top-level packages, then import every module of the bench
# and of sidecar.devtools (the helpers it shares with the tests).
_CHILD = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = frozenset(sys.argv[1].split(","))
preloaded = sorted(BLOCKED & {m.partition(".")[0] for m in sys.modules})
assert not preloaded, f"already imported at start-up: {preloaded}"


class RefuseTestOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is test-only; the bench must not import it")
        return None


sys.meta_path.insert(0, RefuseTestOnly())
import bench, sidecar.devtools

for package in (bench, sidecar.devtools):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
        print("imported", info.name)
try:
    import pytest
except ModuleNotFoundError:
    print("refused pytest")
"""


def _dist_name(requirement: str) -> str:
    name = re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _test_only_modules() -> set[str]:
    """Top-level modules whose every distribution is in the test extra only, and ``tests``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    allowed = {_dist_name(r) for r in [*project["dependencies"], *extras["bench"]]}
    test_only = {_dist_name(r) for r in extras["test"]} - allowed
    blocked = {
        module
        for module, dists in packages_distributions().items()
        if {_dist_name(d) for d in dists} <= test_only
    }
    return blocked | {"tests"}


def test_the_test_only_set_names_the_usual_suspects() -> None:
    blocked = _test_only_modules()
    assert {"pytest", "_pytest", "hypothesis", "selenium", "authlib", "tests"} <= blocked
    # What the bench legitimately needs is not refused.
    assert not {"grpc", "envoy", "requests", "yaml", "redis", "bench", "sidecar"} & blocked


def test_every_bench_module_imports_without_test_only_packages() -> None:
    blocked = ",".join(sorted(_test_only_modules()))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, blocked],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("imported")}
    bench_modules = {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")} - {"bench.__init__"}
    assert bench_modules <= imported
    assert {"sidecar.devtools.envoy", "sidecar.devtools.redis_server"} <= imported
    assert "refused pytest" in proc.stdout  # the finder really was in the way


class _Crash(BaseException):
    """Not an ``Exception``: the bench's per-target guard does not catch it, the run dies."""


def crashing_target(env: TargetEnv) -> Iterator[RunningTarget]:
    """A target factory (``--target tests.test_bench_deps:crashing_target``) that kills the run."""
    raise _Crash("the run dies after the ceiling was measured")


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")
def test_a_crash_late_in_a_run_keeps_the_rows_already_measured(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench", "--quick", "--out", str(out)),
            *("--target", "tests.test_bench_deps:crashing_target"),
            *("--no-oauth-endpoints", "--propagation-keys", "0"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode != 0
    assert "_Crash" in proc.stderr
    latest = json.loads((out / "latest.json").read_text())
    assert latest["complete"] is False
    assert [(r["target"], r["status"]) for r in latest["results"]] == [("ceiling", "ok")]
    assert latest["ceiling"]["rps"] > 0
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert [json.loads(p.read_text()) for p in stamped] == [latest]
