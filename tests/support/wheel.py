"""Building the project's wheel from a source tree, and what a built wheel must hold: shared by
tests/test_wheel.py (the checkout) and tests/test_deploy_manifests.py (the image's build stage)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel --no-deps`` of ``source`` into ``out``; the one wheel it built."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("statuspulse_auth-*.whl")
    return built


def declared_extensions() -> list[str]:
    """The C extensions setup.py names (the compiled Check path, the audit ingest step, the
    packed key table, the spool's framing)."""
    names = re.findall(r'Extension\(\s*"([\w.]+)"', (ROOT / "setup.py").read_text())
    assert "sidecar.dataplane._fastcheck" in names, names
    return names


def missing_extensions(wheel: Path) -> list[str]:
    """The declared extensions ``wheel`` holds no compiled module of (optional in setup.py, so
    a build without a compiler leaves them out silently)."""
    names = zipfile.ZipFile(wheel).namelist()
    return [
        module
        for module in declared_extensions()
        if not any(
            n.startswith(module.replace(".", "/") + ".") and n.endswith(".so") for n in names
        )
    ]
