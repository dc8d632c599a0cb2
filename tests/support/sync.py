"""The sync token the test control planes are configured with (never anonymous: a control
plane without one generates its own, which tests/test_adversarial_audit.py covers)."""

from pathlib import Path

TEST_SYNC_TOKEN = "test-sync-token-0123456789abcdef"


def token_file(directory: Path) -> Path:
    """TEST_SYNC_TOKEN in a file (mode 0600), for sidecars run as subprocesses."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sync-token"
    path.write_text(TEST_SYNC_TOKEN + "\n")
    path.chmod(0o600)
    return path
