"""Guards on the shape of the code: generated code is fresh, the core imports no transport, and
every domain error has a transport mapping."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.admin.errors import GRPC_CODES
from sidecar.core import errors
from sidecar.http.console.errors import CONSOLE_STATUS

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"grpc", "redis", "sqlite3", "psycopg", "starlette", "uvicorn", "envoy", "google"}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--out", str(out)], check=True
    )
    committed = ROOT / "sidecar" / "_gen"

    def files(base: Path) -> set[str]:
        return {
            str(p.relative_to(base))
            for p in base.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    assert files(out) == files(committed), "run: python scripts/genproto.py"
    for rel in files(out):
        assert filecmp.cmp(out / rel, committed / rel, shallow=False), (
            f"{rel} is stale: run python scripts/genproto.py"
        )


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


# The core, and the use cases above it (the decision engine, the OAuth server), import no
# transport; the import-linter contracts in pyproject.toml say the same for whole packages.
INNER = [ROOT / "sidecar" / name for name in ("core", "authz", "oauth")]


@pytest.mark.parametrize(
    "path",
    sorted(p for folder in INNER for p in folder.rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT / "sidecar")),
)
def test_core_imports_no_transport_or_driver(path: Path) -> None:
    assert not (_imports(path) & FORBIDDEN)


def test_import_contracts_hold() -> None:
    """The layers in pyproject.toml (processes -> transports -> use cases -> core) and the
    forbidden imports of the core: ``lint-imports`` exits non-zero on an upward import."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _all_subclasses(sub)
    return found


def test_every_domain_error_has_a_grpc_mapping() -> None:
    classes = _all_subclasses(errors.SpauthError)
    assert set(errors.ALL_ERRORS) - {errors.SpauthError} == classes
    for cls in classes:
        assert cls in GRPC_CODES, f"{cls.__name__} has no gRPC mapping"


def test_every_domain_error_has_a_console_page_status() -> None:
    for cls in _all_subclasses(errors.SpauthError):
        assert cls in CONSOLE_STATUS, f"{cls.__name__} has no console mapping"
