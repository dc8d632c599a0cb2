"""Where ``spauth keys rotate`` writes the new secret. A target is named by a spec string:

- ``dotenv:PATH[#VAR]`` — a dotenv file; ``VAR`` (default ``STATUSPULSE_API_KEY``) is set, other
  lines are kept, the file is replaced atomically with mode 0600.
- ``aws-secretsmanager:SECRET_ID`` — AWS Secrets Manager through boto3 (credentials, region and
  ``AWS_ENDPOINT_URL`` as boto3 reads them); the secret is created if missing.
- ``vault-kv:MOUNT/PATH[#FIELD]`` — HashiCorp Vault KV version 2 through hvac (``VAULT_ADDR``,
  ``VAULT_TOKEN``); ``FIELD`` defaults to ``api_key``; other fields of the secret are kept.
- ``k8s-secret:NAMESPACE/NAME[#KEY]`` — a Kubernetes Secret manifest on stdout, to pipe into
  ``kubectl apply -f -``; ``KEY`` defaults to ``STATUSPULSE_API_KEY``.
- ``exec:COMMAND`` — runs COMMAND (split like a shell would, no shell) with the secret on its
  stdin, e.g. ``exec:gh secret set STATUSPULSE_API_KEY`` in a GitHub Actions job.

Targets that can be read back (dotenv, AWS, Vault) are: the runbook verifies the stored value,
not only the value it meant to store."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

DEFAULT_VAR = "STATUSPULSE_API_KEY"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class TargetError(Exception):
    """A target spec is malformed, or writing or reading the target failed."""


class Target(Protocol):
    spec: str

    def write(self, secret: str) -> None: ...

    def read(self) -> str | None:
        """The stored secret, or None when this target cannot be read back."""
        ...


def parse(spec: str) -> Target:
    """The target named by ``spec`` (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise TargetError(f"malformed target {spec[:80]!r}: use KIND:WHERE, e.g. dotenv:.env")
    factory = _KINDS.get(kind)
    if factory is None:
        raise TargetError(f"unknown target kind {kind!r}: use one of {', '.join(sorted(_KINDS))}")
    return factory(spec, rest)


def _split_field(rest: str, default: str) -> tuple[str, str]:
    where, _, field = rest.partition("#")
    field = field or default
    if not _NAME.fullmatch(field):
        raise TargetError(f"malformed field name {field!r}")
    return where, field


class DotenvTarget:
    def __init__(self, spec: str, rest: str) -> None:
        self.spec = spec
        where, self.var = _split_field(rest, DEFAULT_VAR)
        self.path = Path(where)

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def write(self, secret: str) -> None:
        prefix = f"{self.var}="
        lines = [ln for ln in self._lines() if not ln.lstrip().startswith(prefix)]
        lines.append(f"{prefix}{secret}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:  # mkstemp: mode 0600
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise TargetError(f"cannot write {self.path}: {exc.strerror}") from None

    def read(self) -> str | None:
        prefix = f"{self.var}="
        for line in self._lines():
            if line.lstrip().startswith(prefix):
                return line.lstrip()[len(prefix) :].strip().strip("\"'")
        return None


class AwsSecretsManagerTarget:
    def __init__(self, spec: str, rest: str) -> None:
        self.spec = spec
        self.secret_id = rest
        self._client: Any = None

    def _sm(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError:
                raise TargetError("boto3 is not installed: pip install 'spauth[rotate]'") from None
            self._client = boto3.client("secretsmanager")
        return self._client

    def write(self, secret: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        sm = self._sm()
        try:
            try:
                sm.put_secret_value(SecretId=self.secret_id, SecretString=secret)
            except sm.exceptions.ResourceNotFoundException:
                sm.create_secret(Name=self.secret_id, SecretString=secret)
        except (BotoCoreError, ClientError) as exc:
            raise TargetError(f"AWS Secrets Manager: {exc}") from None

    def read(self) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            value = self._sm().get_secret_value(SecretId=self.secret_id)
        except (BotoCoreError, ClientError) as exc:
            raise TargetError(f"AWS Secrets Manager: {exc}") from None
        return str(value["SecretString"])


class VaultKvTarget:
    def __init__(self, spec: str, rest: str) -> None:
        self.spec = spec
        where, self.field = _split_field(rest, "api_key")
        self.mount, _, self.path = where.partition("/")
        if not self.mount or not self.path:
            raise TargetError(f"malformed Vault target {spec!r}: use vault-kv:MOUNT/PATH[#FIELD]")
        self._client: Any = None

    def _kv(self) -> Any:
        if self._client is None:
            try:
                import hvac
            except ImportError:
                raise TargetError("hvac is not installed: pip install 'spauth[rotate]'") from None
            self._client = hvac.Client()  # VAULT_ADDR, VAULT_TOKEN as hvac reads them
        return self._client.secrets.kv.v2

    def _current(self) -> dict[str, Any]:
        import hvac.exceptions

        try:
            got = self._kv().read_secret_version(
                path=self.path, mount_point=self.mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            return {}
        except (hvac.exceptions.VaultError, OSError) as exc:
            raise TargetError(f"Vault: {exc}") from None
        return dict(got["data"]["data"])

    def write(self, secret: str) -> None:
        import hvac.exceptions

        data = {**self._current(), self.field: secret}
        try:
            self._kv().create_or_update_secret(path=self.path, secret=data, mount_point=self.mount)
        except (hvac.exceptions.VaultError, OSError) as exc:
            raise TargetError(f"Vault: {exc}") from None

    def read(self) -> str | None:
        value = self._current().get(self.field)
        return str(value) if value is not None else None


class K8sSecretTarget:
    def __init__(self, spec: str, rest: str, out: Any = None) -> None:
        self.spec = spec
        where, self.key = _split_field(rest, DEFAULT_VAR)
        self.namespace, _, self.name = where.partition("/")
        for part in (self.namespace, self.name):
            if not _K8S_NAME.fullmatch(part):
                raise TargetError(f"malformed Kubernetes name {part!r} in {spec!r}")
        self.out = out

    def write(self, secret: str) -> None:
        manifest = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "type": "Opaque",
            "data": {self.key: base64.b64encode(secret.encode()).decode()},
        }
        out = self.out or sys.stdout
        out.write(json.dumps(manifest, indent=2) + "\n")
        out.flush()

    def read(self) -> str | None:
        return None


class ExecTarget:
    def __init__(self, spec: str, rest: str) -> None:
        self.spec = spec
        self.argv = shlex.split(rest)
        if not self.argv:
            raise TargetError("exec: needs a command")

    def write(self, secret: str) -> None:
        try:
            # The operator's own command, run without a shell.
            done = subprocess.run(
                self.argv, input=secret, text=True, capture_output=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TargetError(f"exec {self.argv[0]}: {exc}") from None
        if done.returncode != 0:
            # Its stderr may echo input: say only how it ended.
            raise TargetError(f"exec {self.argv[0]}: exit status {done.returncode}")

    def read(self) -> str | None:
        return None


_KINDS: dict[str, Callable[[str, str], Target]] = {
    "dotenv": DotenvTarget,
    "aws-secretsmanager": AwsSecretsManagerTarget,
    "vault-kv": VaultKvTarget,
    "k8s-secret": K8sSecretTarget,
    "exec": ExecTarget,
}
