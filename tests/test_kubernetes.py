"""deploy/kubernetes: every manifest valid against the Kubernetes API schemas (offline), and in
step with what `vae serve` reads and the image serves. No cluster runs here."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vaeserve.service.settings import ENV_PREFIX, ServeSettings

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES = "1.31"
MANIFESTS = sorted(p for p in ROOT.glob("*.yaml") if p.name != "kustomization.yaml")
VARIABLES = {ENV_PREFIX + name.upper() for name in ServeSettings.__dataclass_fields__}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    kubernetes_validate.validate(load(path), KUBERNETES, strict=True)  # raises naming the field


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load(ROOT / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    assert [image["name"] for image in kustomization["images"]] == ["vaeserve"]


def container(spec: dict) -> dict:
    (only,) = spec["containers"]
    return only


def test_deployment_matches_the_server() -> None:
    pod = load(ROOT / "deployment.yaml")["spec"]["template"]["spec"]
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
    deployment = load(ROOT / "deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in ("service.yaml", "service-headless.yaml"):
        service = load(ROOT / name)["spec"]
        assert service["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["ports"]} <= {"grpc", "http", "metrics"}
    assert load(ROOT / "service-headless.yaml")["spec"]["clusterIP"] == "None"
    assert load(ROOT / "pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert load(ROOT / "hpa.yaml")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_kserve_inference_service_speaks_v2_with_the_same_image() -> None:
    service = load(ROOT / "kserve" / "inferenceservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = service["spec"]["predictor"]
    assert predictor["protocolVersion"] == "v2"
    served = container(predictor)
    assert served["image"] == container(load(ROOT / "deployment.yaml")["spec"]["template"]["spec"])["image"]
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


def object_storage_deployment() -> dict:
    """../deployment.yaml with the object-storage variant's JSON patch applied (as kustomize
    applies it)."""
    import jsonpatch

    patch = load(ROOT / "object-storage" / "models-from-the-store.yaml")
    return jsonpatch.apply_patch(load(ROOT / "deployment.yaml"), patch)


def test_the_object_storage_variant_serves_a_bucket_without_a_volume_claim() -> None:
    variant = load(ROOT / "object-storage" / "kustomization.yaml")
    assert variant["resources"] == ["../"]
    deleted = load(ROOT / "object-storage" / "no-models-pvc.yaml")
    assert deleted["$patch"] == "delete" and deleted["metadata"] == load(ROOT / "models-pvc.yaml")["metadata"]
    deployment = object_storage_deployment()
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
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
