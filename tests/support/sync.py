"""The sync token the test control planes are configured with (never anonymous: a control
plane without one generates its own, which tests/test_adversarial_ingest.py covers)."""

TEST_SYNC_TOKEN = "test-sync-token-0123456789abcdef"
