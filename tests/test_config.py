"""Configuration errors name the setting and the value."""

from __future__ import annotations

import pytest

from sidecar.config import ConfigError, load_settings


def test_defaults() -> None:
    s = load_settings(environ={})
    assert s.admin_addr == "127.0.0.1:50051"
    assert s.http_addr == "127.0.0.1:8080"
    assert s.sidecar_addr == "127.0.0.1:9191"
    assert s.key_default_lifetime == 90 * 86400
    assert s.store_url.endswith("spauth.db")


def test_environment_then_flags() -> None:
    env = {"SPAUTH_ADMIN_ADDR": "127.0.0.1:6000", "SPAUTH_KEY_MAX_LIFETIME": "30d"}
    s = load_settings(
        {"admin_addr": "127.0.0.1:7000"}, environ={**env, "SPAUTH_KEY_DEFAULT_LIFETIME": "7d"}
    )
    assert s.admin_addr == "127.0.0.1:7000"
    assert s.key_max_lifetime == 30 * 86400


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SPAUTH_ADMIN_ADDR": "nowhere"}, "admin_addr"),
        ({"SPAUTH_KEY_MAX_LIFETIME": "forever"}, "key_max_lifetime"),
        ({"SPAUTH_KEY_DEFAULT_LIFETIME": "400d"}, "key_default_lifetime"),
        ({"SPAUTH_LOG_LEVEL": "loud"}, "log_level"),
        ({"SPAUTH_SWEEP_INTERVAL": "often"}, "sweep_interval"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(environ=env)
