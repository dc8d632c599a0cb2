"""deploy/envoy/admin-transcoder.yaml with the real Envoy in front of a real control plane: the
admin API through Envoy's gRPC-JSON transcoder answers like the control plane's own HTTP port
(same paths, same JSON field names, same statuses), and the committed descriptor set is fresh."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import RunningControlPlane
from tests.support.envoy import EnvoyProcess, point_cluster, point_listener

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "envoy" / "admin-transcoder.yaml"
DESCRIPTORS = ROOT / "deploy" / "envoy" / "statuspulse-auth.pb"


def test_committed_descriptor_set_is_fresh(tmp_path: Path) -> None:
    fresh = tmp_path / "d.pb"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--descriptor-set", str(fresh)],
        check=True,
    )
    assert fresh.read_bytes() == DESCRIPTORS.read_bytes(), (
        "deploy/envoy/statuspulse-auth.pb is stale: run `make descriptors` and commit it"
    )


@pytest.fixture
def envoy(control_plane: RunningControlPlane) -> Iterator[EnvoyProcess]:
    config = yaml.safe_load(CONFIG.read_text())
    point_listener(config, "admin_http", ("127.0.0.1", 0), ("127.0.0.1", 0))
    point_cluster(config, "spauth_admin", [("127.0.0.1", control_plane.plane.admin_port)])
    http_filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    transcoder = http_filters["typed_config"]["http_filters"][0]["typed_config"]
    transcoder["proto_descriptor"] = str(DESCRIPTORS)  # the test's cwd may be anywhere
    with EnvoyProcess(rendered=config, listener="admin_http") as proxy:
        yield proxy


@pytest.mark.envoy
def test_the_transcoder_serves_the_same_api(
    envoy: EnvoyProcess, control_plane: RunningControlPlane
) -> None:
    op = {"authorization": f"Bearer {control_plane.operator_key}"}
    direct = httpx.Client(base_url=f"http://127.0.0.1:{control_plane.plane.http_port}")
    via = httpx.Client(base_url=envoy.url)
    with direct, via:
        body = {"name": "via-envoy", "scopes": ["checks:read"]}
        created = via.post("/v1/workspaces/acme/keys", json=body, headers=op)
        assert created.status_code == 200, created.text
        key_id = created.json()["api_key"]["id"]
        assert created.json()["key"].startswith("spk_")
        shown_via = via.get(f"/v1/keys/{key_id}", headers=op).json()
        shown_direct = direct.get(f"/v1/keys/{key_id}", headers=op).json()
        assert shown_via == shown_direct  # same names, same enums, same times
        via.post("/v1/workspaces/acme/keys", json=body, headers=op).raise_for_status()
        page = via.get("/v1/keys", params={"workspace": "acme", "page_size": 1}, headers=op)
        assert page.json()["next_page_token"]
        revoked = via.delete(f"/v1/keys/{key_id}", params={"reason": "done"}, headers=op)
        assert revoked.json()["api_key"]["state"] == "API_KEY_STATE_REVOKED"
        # The admin API's refusals keep their status through the transcoder.
        assert via.get("/v1/keys").status_code == 401
        assert via.get("/v1/keys/key_doesnotexist0000", headers=op).status_code == 404
        bad = via.post("/v1/workspaces/acme/keys", json={"name": "", "scopes": []}, headers=op)
        assert bad.status_code == 400
        # Another workspace's key reaches nothing of acme's.
        globex = {"name": "g", "scopes": ["keys:manage", "checks:read"]}
        other = via.post("/v1/workspaces/globex/keys", json=globex, headers=op).json()["key"]
        stranger = {"authorization": f"Bearer {other}"}
        assert (
            via.get("/v1/keys", params={"workspace": "acme"}, headers=stranger).status_code == 403
        )
        assert via.get("/v1/whoami", headers=stranger).json()["api_key"]["workspace"] == "globex"
        assert via.get("/v1/nowhere", headers=op).status_code == 404
