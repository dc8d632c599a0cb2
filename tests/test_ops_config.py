"""One configuration: a TOML file under SPAUTH_* environment variables under flags, validated at
start-up with errors that name the setting, the value and where it came from."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import ConfigError, Settings, SidecarSettings
from sidecar.ops.configfile import load_control_plane_config, load_sidecar_config
from tests.support.ops import http_get, wait_until
from tests.support.ports import free_ports

ROOT = Path(__file__).resolve().parent.parent


def spauth(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPAUTH_")}
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**environ, **(env or {})},
    )  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'admin_addr = "0.0.0.0:1"\nhttp_addr = "0.0.0.0:2"\nlog_level = "debug"\n'
        '[sidecar]\nthreads = 2\nlisten = "127.0.0.1:3"\n',
    )
    env = {"SPAUTH_HTTP_ADDR": "0.0.0.0:20", "SPAUTH_SIDECAR_THREADS": "8"}
    plane = load_control_plane_config(path, {"log_level": "warning"}, env)
    assert (plane.admin_addr, plane.http_addr, plane.log_level) == (
        "0.0.0.0:1",
        "0.0.0.0:20",
        "warning",
    )
    side = load_sidecar_config(path, {"listen": "127.0.0.1:30"}, env)
    assert (side.threads, side.listen) == (8, "127.0.0.1:30")
    # Nothing set anywhere: the defaults.
    assert load_control_plane_config(None, None, {}) == Settings()


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text((ROOT / "deploy/policy/statuspulse-api.toml").read_text())
    path = write(tmp_path, '[sidecar]\npolicy_file = "policy.toml"\nstate_dir = "/var/lib/x"\n')
    side = load_sidecar_config(path, None, {})
    assert side.policy_file == tmp_path / "policy.toml"
    assert side.state_dir == Path("/var/lib/x")


@pytest.mark.parametrize(
    ("text", "errors"),
    [
        ('admin_adr = "0.0.0.0:1"', ["admin_adr: unknown setting (did you mean 'admin_addr'?)"]),
        ("sweep_interval = true", ["sweep_interval: expected a number, got True"]),
        ('[sidecar]\nthreads = "many"', ["threads: expected an integer, got 'many'"]),
        ("[sidecar]\nthreads = 100", ["threads: must be between 1 and 64, got 100"]),
        ("[sidecar]\nlisten = 9191", ["listen: expected a string, got 9191"]),
        (
            'admin_addr = "nowhere"\ntracing_endpoint = "collector:4317"\n[sidecar]\nlisten = "x"',
            [
                "admin_addr: expected HOST:PORT, got 'nowhere'",
                "tracing_endpoint: expected http(s)://HOST:PORT, got 'collector:4317'",
                "listen: expected HOST:PORT, got 'x'",
            ],
        ),
        ('key_max_lifetime = "forever"', ["key_max_lifetime: expected a duration such as 90d"]),
        ("sidecar = 3", ["[sidecar] must be a table"]),
        ('admin_addr = "x"\nlog_level = \n', ["not valid TOML", "line 2"]),
    ],
)
def test_config_check_lists_every_error(tmp_path: Path, text: str, errors: list[str]) -> None:
    result = spauth("config", "check", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stdout
    for error in errors:
        assert error in result.stderr
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "config.toml") in result.stderr  # which file


def test_errors_name_the_environment_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_sidecar_config(None, None, {"SPAUTH_SIDECAR_MAX_STALENESS": "soon"})
    assert str(err.value) == (
        "max_staleness: expected a number, got 'soon' (from SPAUTH_SIDECAR_MAX_STALENESS)"
    )


def test_config_check_prints_the_effective_config_without_secrets(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'admin_addr = "0.0.0.0:50051"\nsync_token = "s3cret-sync"\n'
        'database_url = "postgresql://spauth:hunter2@db:5432/spauth"\n[sidecar]\nthreads = 2\n',
    )
    kek = "Qk9HVVMtYnV0LTMyLWJ5dGVzLWxvbmctZm9yLXRlc3Q"
    env = {"SPAUTH_SIDECAR_WORKERS": "2", "SPAUTH_KEY_ENCRYPTION_KEY": kek}
    result = spauth("config", "check", str(path), env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "s3cret-sync" not in out and "hunter2" not in out and kek not in out
    lines = {line.split(" = ")[0]: line for line in out.splitlines() if " = " in line}
    assert lines["admin_addr"].endswith("# config file")
    assert lines["http_addr"].endswith("# default")
    assert lines["workers"].endswith("# SPAUTH_SIDECAR_WORKERS")
    assert "postgresql://spauth:<redacted>@db:5432/spauth" in lines["database_url"]
    # The output is itself a valid config file (secrets aside).
    again_path = write(tmp_path, out.replace('"<redacted>"', '""'))
    again = spauth("config", "check", str(again_path), env={"SPAUTH_KEY_ENCRYPTION_KEY": kek})
    assert again.returncode == 0, again.stderr


def test_control_plane_command_runs_from_a_config_file(tmp_path: Path) -> None:
    admin, http = free_ports(2)
    path = write(
        tmp_path,
        f'admin_addr = "127.0.0.1:{admin}"\nhttp_addr = "127.0.0.1:{http}"\n'
        f'data_dir = "data"\ndrain_delay = 0.2\n',
    )
    log = (tmp_path / "cp.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "control-plane", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http}"
        wait_until(lambda: _status(url + "/readyz") == 200, what="control plane ready")
        metrics = http_get(url + "/metrics")[1]
        assert b"spauth_admin_calls_total" in metrics
        assert b"spauth_decisions_total" not in metrics  # no embedded sidecar here
        assert (tmp_path / "data" / "bootstrap-key").stat().st_mode & 0o777 == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        log.close()
    assert proc.returncode == 0
    secret = (tmp_path / "data" / "bootstrap-key").read_text().strip()
    # Written to the private file only, never printed: this output goes to shared logs.
    assert secret not in out and secret not in (tmp_path / "cp.log").read_text()


def _status(url: str) -> int:
    try:
        return http_get(url)[0]
    except OSError:
        return 0


def test_bad_config_stops_the_process_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[sidecar]\nmax_staleness = -1\nmetrics_addr = "nowhere"\n')
    result = spauth("sidecar", "--config", str(path))
    assert result.returncode == 2
    assert "max_staleness: must be 0 (never) or a positive number of seconds" in result.stderr
    assert "metrics_addr: expected HOST:PORT, got 'nowhere'" in result.stderr


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for cls in (Settings, SidecarSettings):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in doc, f"{cls.__name__}.{f.name} is undocumented"
