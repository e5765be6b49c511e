"""`vae export`: checkpoint → checked ONNX pair + manifest → ``REPO/NAME/VERSION``.

Everything is built in a staging folder beside the versions (``REPO/NAME/.staging-*``,
which no loader reads), checked there, and only then renamed into place; a crash
or a failed check leaves no version behind, half-written or unchecked. The folder's
name carries its process id and host, so the next export sweeps away what a killed
one left (its process is gone) without touching an export still running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from vaeserve import __version__, ood
from vaeserve.atomic import disk_full_said, staging_dir
from vaeserve.datasets import evaluation_inputs, load_run_data
from vaeserve.errors import ExportError
from vaeserve.evaluation import evaluate
from vaeserve.export import checks, graphs, variants
from vaeserve.likelihoods import Likelihood
from vaeserve.manifest import FileRecord, Manifest
from vaeserve.prior import PRIOR_FILE, Prior
from vaeserve.repository import ModelVersion, file_record, load_version, next_version, sha256_file
from vaeserve.runtime import OnnxPair
from vaeserve.storage import ObjectPath
from vaeserve.training import checkpoint
from vaeserve.training.architectures import architecture as registered
from vaeserve.training.backend import numpy_prior
from vaeserve.training.evaluate import EVALUATION_SEED, evaluation_path

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path
    repo: Path | ObjectPath
    name: str
    version: int | None = None
    force: bool = False
    variants: tuple[str, ...] = ()
    iw_samples: int = 100
    data_dir: Path | None = None
    cache_dir: Path | None = None


def export_to_store(request: ExportRequest, progress: bool = False) -> tuple[ModelVersion, ObjectPath]:
    """Export into a local staging repository, check there, then upload: the manifest last, so
    a server polling the store never sees the version before every file is there. A version
    replaced with --force loses its manifest first, for the same reason."""
    from vaeserve.remote_repository import RepositoryMirror, remove_version, upload_version

    store = request.repo
    existing = RepositoryMirror(store).remote_versions(request.name)
    number = request.version or max(existing, default=0) + 1
    target = store / request.name / str(number)
    if number in existing and not request.force:
        raise ExportError(f"{target} already exists; pass --force to replace it or omit --version")
    with tempfile.TemporaryDirectory(prefix="vaeserve-export-") as local:
        version = export_model(dataclasses.replace(request, repo=Path(local), version=number), progress)
        if number in existing:
            remove_version(target)
        return version, upload_version(version, store)


def export_model(request: ExportRequest, progress: bool = False) -> ModelVersion:
    graphs.check_torch()
    if not NAME_PATTERN.match(request.name):
        raise ExportError(f"model name {request.name!r}: use letters, digits, '.', '_', '-' (max 64)")
    if request.version is not None and request.version < 1:
        raise ExportError(f"--version {request.version}: versions are positive integers")
    source = checkpoint.resolve(request.checkpoint)
    state = checkpoint.load(source)
    variants.check_for(state["config"].get("architecture", "mlp"), request.variants)
    model_dir = request.repo / request.name
    version = request.version or next_version(model_dir)
    target = model_dir / str(version)
    if target.exists() and not request.force:
        raise ExportError(f"{target} already exists; pass --force to replace it or omit --version")
    model_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale(model_dir)
    with disk_full_said(model_dir):
        staging = staging_dir(f".staging-{version}-{owner()}-", model_dir)
        try:
            build_version(request, state, source, version, staging, progress)
            load_version(staging)  # the manifest describes exactly the files we wrote
            publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_version(target)


def build_version(
    request: ExportRequest, state: dict[str, Any], source: Path, version: int, folder: Path, progress: bool
) -> None:
    config = state["config"]
    model = checkpoint.model_from(state)
    dataset = load_run_data(
        config, state["dataset"].get("source"), request.data_dir, request.cache_dir, progress=progress
    )
    x_test = evaluation_inputs(dataset.test_images, config["binarization"], EVALUATION_SEED)
    metadata = {
        "vaeserve_version": __version__,
        "model_name": request.name,
        "model_version": str(version),
        "input_size": str(model.input_size),
        "latent_size": str(model.latent_size),
        "image_shape": json.dumps(state["image_shape"]),
        "binarization": config["binarization"],
        "likelihood": model.likelihood.name,
    }
    encoder, decoder = graphs.export_pair(model, folder, metadata)
    for path in (encoder, decoder):
        checks.check_graph(path)
    pair = OnnxPair(encoder, decoder)
    differences, rounding = checks.max_differences(model, pair, x_test)
    checks.check_parity(differences, rounding)
    likelihood_forms = checks.likelihood_difference(model, pair, x_test)
    prior = numpy_prior(model)
    prior_record, prior_parity = write_prior(model, prior, pair, folder)
    built = {}
    for variant in request.variants:
        for role, path in (("encoder", encoder), ("decoder", decoder)):
            variants.build(variant, path, folder / f"{role}.{variant}.onnx")
        built[variant] = variants.measure(variant, folder, pair, x_test, model.likelihood)
    evaluation = find_evaluation(source) or evaluate_pair(
        pair, x_test, request.iw_samples, model.likelihood, prior
    )
    reference = score_reference(pair, x_test, model.likelihood, tuple(state["image_shape"]), prior)
    manifest = Manifest(
        vaeserve_version=__version__,
        name=request.name,
        version=version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        input_size=model.input_size,
        latent_size=model.latent_size,
        image_shape=tuple(state["image_shape"]),
        binarization=config["binarization"],
        likelihood=model.likelihood.name,
        likelihood_options=model.likelihood.options(),
        opset=graphs.OPSET,
        exporter=f"torch.onnx dynamo exporter, torch {torch.__version__}, onnx {onnx.__version__}",
        graphs={role: graph_record(path) for role, path in (("encoder", encoder), ("decoder", decoder))},
        parity={
            "batch_sizes": list(checks.PARITY_BATCH_SIZES),
            "tolerance": checks.PARITY_TOLERANCE,
            "max_abs_diff": differences,
            "float32_rounding": rounding,
            "rounding_margin": checks.ROUNDING_MARGIN,
            "likelihood_numpy_vs_torch": likelihood_forms,
            **prior_parity,
        },
        prior=prior_record,
        architecture=architecture(config, model, prior),
        variants=built,
        training={
            "config": config,
            "preset": state.get("preset", ""),
            "dataset": state["dataset"]["name"],
            "split_sizes": state["dataset"]["split_sizes"],
            "data_source": state["dataset"].get("source"),
            "epochs": state["epoch"],
            "planned_epochs": config["epochs"],
            "stopped_early": stopped_early(state),
            "best_validation_elbo": state["best_validation_elbo"],
        },
        evaluation=evaluation,
        score_reference=reference,
        source_checkpoint={"file": source.name, "sha256": sha256_file(source)},
    )
    manifest.write(folder)


def stopped_early(state: dict[str, Any]) -> str | None:
    """Why the run exported trained fewer epochs than it planned, or None when it trained them all."""
    planned, trained = state["config"]["epochs"], state["epoch"]
    if trained >= planned:
        return None
    why = state.get("stopped") or "it was interrupted or is still running (vae train --resume continues it)"
    return f"trained {trained} of {planned} planned epochs: {why}"


def graph_record(path: Path) -> FileRecord:
    record = file_record(path)
    return FileRecord(record.file, record.size, record.sha256, graphs.io_signature(onnx.load(path)))


def find_evaluation(source: Path) -> dict[str, Any] | None:
    """The run's saved test evaluation, if it scored exactly this checkpoint."""
    path = evaluation_path(source.parent, "test")
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("checkpoint_sha256") != sha256_file(source):
        return None
    return {**saved, "source": "checkpoint"}


def write_prior(model: Any, prior: Prior, pair: OnnxPair, folder: Path) -> tuple[FileRecord | None, dict]:
    """A learned prior's mixture into the version, checked against the exported encoder at the
    pseudo-inputs and against PyTorch's log p(z); the standard normal needs no file."""
    if prior.means is None:
        return None, {}
    differences = checks.prior_differences(model, prior, pair)
    checks.check_prior_parity(differences)
    path = folder / PRIOR_FILE
    path.write_bytes(prior.to_bytes())
    return file_record(path), {"prior": differences}


def architecture(config: dict[str, Any], model: Any, prior: Prior) -> dict[str, Any]:
    """The networks (as their registered architecture describes them), p(z) and q(z|x) as
    trained: what the graphs and the prior file compute."""
    name = config.get("architecture", "mlp")  # runs from before the registry are mlp runs
    return {
        "name": name,
        **registered(name).describe(
            config, model.image_shape, model.latent_size, model.likelihood.params_per_value
        ),
        "row_shape": list(model.row_shape),
        "latent_size": model.latent_size,
        "likelihood": model.likelihood.name,
        "posterior": "diagonal Gaussian q(z|x) = N(mean, stddev²): Encode's outputs, what embeddings hold",
        "prior": config.get("prior", "standard-normal"),
        "prior_kind": prior.kind,
        "prior_components": prior.components,
    }


def score_reference(
    pair: OnnxPair, x_test: Any, likelihood: Likelihood, image_shape: tuple, prior: Prior
) -> dict[str, Any]:
    """The test set's Score percentiles (vaeserve.ood.reference), for flagging both tails."""
    k = ood.REFERENCE_IW_SAMPLES
    values = ood.scores(
        pair.encode, pair.decode_logits, x_test, k, EVALUATION_SEED, likelihood, image_shape, prior=prior
    )
    return {"split": "test", "rows": len(x_test), "iw_samples": k, "percentiles": ood.reference(values)}


def evaluate_pair(
    pair: OnnxPair, x_test: Any, iw_samples: int, likelihood: Likelihood, prior: Prior
) -> dict[str, Any]:
    result = evaluate(
        pair.encode,
        pair.decode_logits,
        x_test,
        iw_samples,
        seed=EVALUATION_SEED,
        likelihood=likelihood,
        prior=prior,
    )
    return {"split": "test", **result.to_dict(), "source": "onnx-at-export"}


# .staging-VERSION-PID@HOST-RANDOM and .retired-VERSION-PID@HOST-old
_LEFTOVER = re.compile(r"^\.(?:staging|retired)-.+?-(\d+)@(.+)-[a-z0-9_]+$")


def owner() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def sweep_stale(model_dir: Path) -> None:
    """Remove the staging and retired folders of exports killed on this host: their process
    is gone. A running export's folder, or another host's, stays."""
    for folder in model_dir.glob(".*-*"):
        match = _LEFTOVER.match(folder.name)
        if match and match.group(2) == socket.gethostname() and not _running(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def publish(staging: Path, target: Path) -> None:
    """Rename the checked staging folder into place; an old version (--force) goes only after."""
    if target.exists():
        retired = target.with_name(f".retired-{target.name}-{owner()}-old")
        os.rename(target, retired)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        os.rename(staging, target)
    except OSError as exc:
        raise ExportError(
            f"{target} appeared while exporting ({exc.strerror}); nothing was written"
        ) from None
