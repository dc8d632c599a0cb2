"""Every Envoy config we ship must load in the Envoy version we test against.

``--mode validate`` parses the bootstrap, resolves every typed extension and checks the
cross-references (clusters named by filters and routes) without binding any port.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.envoy import DEFAULT_CONFIG, find_envoy

CONFIGS = sorted(DEFAULT_CONFIG.parent.glob("*.yaml"))


def test_the_front_proxy_config_is_among_those_validated() -> None:
    assert DEFAULT_CONFIG in CONFIGS


@pytest.mark.envoy
@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_envoy_accepts_config(config: Path) -> None:
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr

    assert result.returncode == 0, output
    assert f"configuration '{config}' OK" in output
    # Deprecated fields still load today and break on a later Envoy; catch them now.
    assert "deprecated" not in output.lower(), output
