"""Every shell block of docs/api.md, in order and as pasted, against a live control plane (its
HTTP port on 127.0.0.1:0), so the cURL examples cannot drift from the API."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningControlPlane
from tests.support.docblocks import shell_blocks

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl, jq")
def test_every_example_of_docs_api_md_runs(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    blocks = [b for b in shell_blocks(DOC) if not b.skipped]
    assert len(blocks) >= 8
    script = "set -euo pipefail\n" + "\n".join(b.text for b in blocks)
    env = {
        **os.environ,
        "SPAUTH_API": f"http://127.0.0.1:{control_plane.plane.http_port}",
        "STATUSPULSE_API_KEY": control_plane.operator_key,
    }
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert done.stderr == "", done.stderr
    created = (tmp_path / "created.json").read_text()
    assert '"checks:read"' in out and "nightly-sync-job" in out
    assert '"allowed": true' in out and '"reason": "ok"' in out  # whoami's decision
    assert '"state": "API_KEY_STATE_REVOKED"' in out
    assert '"code": "not_found"' in out and '"request_id": "doc-example-1"' in out
    assert "\n401\n" in out
    assert "dev@acme.example\tdashboard:read" in out  # the session, listed
    assert out.count('"revoked_at": "') >= 2  # the key and the session
    assert "key.revoked" in out and '"ok": true' in out  # the audit trail and its chain
    assert '"key":"spk_' in created and created.count("spk_") == 1  # the secret, once
