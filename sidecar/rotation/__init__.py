"""``spauth keys rotate``: the rotation runbook in one resumable command. Create Replacement,
write the new secret to a target, verify it through the admin API, wait until the old key is no
longer used (or a grace period ends), revoke the old key. ``targets`` holds where secrets can
go; ``runbook`` the steps; ``state`` the file that makes an interrupted run resumable."""
