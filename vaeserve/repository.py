"""The model repository: ``REPO/NAME/VERSION/{encoder.onnx, decoder.onnx, manifest.json}``, and
``prior.npz`` for a model whose p(z) was learned.

The export stage writes it; the service, the embedding tool and ``vae evaluate
--model`` read it through this module, with numpy and the standard library only.
A version folder is a positive integer; anything else in ``REPO/NAME`` (staging
folders of an export in progress start with a dot) is ignored. Loading verifies
the size and SHA-256 of every file the manifest lists, so a tampered or truncated
file is refused with an error naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from vaeserve.atomic import staging_dir
from vaeserve.errors import ConfigError, RepositoryError
from vaeserve.layout import ImageLayout
from vaeserve.likelihoods import Likelihood, likelihood
from vaeserve.manifest import MANIFEST, SCHEMA_VERSION, FileRecord, Manifest
from vaeserve.prior import STANDARD, Prior

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Manifest", "ModelVersion"]


@contextlib.contextmanager
def readable() -> Iterator[None]:
    """A file or folder this process may not read is a RepositoryError naming it, the uid and the
    fix: an image or a pod often runs as another uid than the job that exported."""
    try:
        yield
    except PermissionError as exc:
        raise RepositoryError(
            f"{exc.filename}: permission denied to uid {os.getuid()}, the user this server runs as; "
            "make the repository readable to it (chmod -R a+rX on the repository, or export with "
            "umask 022)"
        ) from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> FileRecord:
    return FileRecord(path.name, path.stat().st_size, sha256_file(path))


@dataclass(frozen=True)
class ModelVersion:
    """One verified version of a model: its folder and manifest."""

    name: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def input_size(self) -> int:
        return self.manifest.input_size

    @property
    def latent_size(self) -> int:
        return self.manifest.latent_size

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.manifest.image_shape

    @property
    def likelihood(self) -> Likelihood:
        """p(x|z), the registered part the manifest names."""
        try:
            return likelihood(self.manifest.likelihood, **self.manifest.likelihood_options)
        except (ConfigError, TypeError) as exc:
            raise RepositoryError(f"{self.path}: manifest likelihood: {exc}") from None

    @property
    def variants(self) -> list[str]:
        return ["fp32", *self.manifest.variants]

    def load_prior(self) -> Prior:
        """p(z): the mixture the version holds, or the standard normal."""
        if self.manifest.prior is None:
            return STANDARD
        return Prior.read(self.path / self.manifest.prior.file)

    def graph_path(self, role: str, variant: str = "fp32") -> Path:
        """The ONNX file of ``role`` (encoder or decoder) in ``variant`` (fp32, int8, fp16)."""
        file = self.manifest.graph_file(role, variant)
        if file is None:
            raise RepositoryError(
                f"{self.path}: no {variant!r} variant; this version has {', '.join(self.variants)}"
            )
        return self.path / file


def version_numbers(model_dir: Path) -> list[int]:
    """The complete versions of a model, ascending."""
    with readable():
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdecimal() and int(p.name) > 0)


def model_names(repo: Path) -> list[str]:
    with readable():
        if not repo.is_dir():
            raise RepositoryError(f"{repo}: no such model repository")
        return sorted(p.name for p in repo.iterdir() if p.is_dir() and version_numbers(p))


def next_version(model_dir: Path) -> int:
    return max(version_numbers(model_dir), default=0) + 1


def copy_version(source: Path, repo: Path, name: str, number: int) -> Path:
    """The version folder ``source`` published again as ``repo/NAME/NUMBER``: the same files, its
    manifest naming the copy. It is written under a hidden staging name and renamed into place,
    as an export publishes, so a server following ``repo`` never sees it half copied. The files
    are copied as they are (a damaged one too): whoever loads the copy verifies it, as any version."""
    manifest = Manifest.read(source)
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(f".copy-{number}-", model_dir)
    shutil.copytree(source, staging, dirs_exist_ok=True)
    replace(manifest, name=name, version=number).write(staging)
    os.rename(staging, model_dir / str(number))
    return model_dir / str(number)


def resolve(repo: Path, name: str, version: int | str = "latest") -> ModelVersion:
    """Load and verify ``REPO/NAME/VERSION``; ``latest`` is the highest version number."""
    model_dir = repo / name
    versions = version_numbers(model_dir)
    if not versions:
        raise RepositoryError(f"{model_dir}: no versions of model {name!r} in {repo}")
    if version == "latest":
        number = versions[-1]
    else:
        number = _version_number(version)
        if number not in versions:
            raise RepositoryError(f"{model_dir}: no version {number}; available: {versions}")
    return load_version(model_dir / str(number))


def open_path(path: Path) -> ModelVersion:
    """``models/NAME/VERSION`` or ``models/NAME`` (its latest version)."""
    if path.name.isdecimal():
        versions = version_numbers(path.parent)
        if not (path / MANIFEST).exists() and versions and int(path.name) not in versions:
            raise RepositoryError(f"{path.parent}: no version {path.name}; versions there: {versions}")
        return load_version(path)
    if not version_numbers(path) and path.is_dir():
        with readable():
            models = sorted(p.name for p in path.iterdir() if p.is_dir() and version_numbers(p))
        if models:
            raise RepositoryError(
                f"{path} is a model repository, not a model: name one, {path / models[0]} "
                f"(models there: {', '.join(models)})"
            )
    return resolve(path.parent, path.name, "latest")


def load_version(path: Path) -> ModelVersion:
    """Read the manifest of a version folder and verify every file it lists. In a repository
    (``NAME/NUMBER``) the folder must be the one the manifest names: a copied folder left
    with another version's manifest would answer under a version it is not."""
    with readable():
        return _load_version(path)


def _load_version(path: Path) -> ModelVersion:
    manifest = Manifest.read(path)
    if path.name.isdecimal() and (int(path.name), path.parent.name) != (manifest.version, manifest.name):
        raise RepositoryError(
            f"{path}: its manifest is {manifest.name}/{manifest.version}; a version folder "
            "holds its own export (vae export --version N writes it there)"
        )
    layout = ImageLayout.of(manifest.image_shape)
    if layout is not None and layout.channels > 1 and "row_shape" not in manifest.architecture:
        # Exports before colour rows were channels first read rows channels last: served now,
        # every colour input would be read in the wrong order.
        raise RepositoryError(
            f"{path}: a colour model exported before vaeserve's rows were channels first (vaeserve.layout); "
            "its inputs would be read in the wrong order: train and export it again"
        )
    for record in manifest.files():
        verify_file(path / record.file, record)
    return ModelVersion(manifest.name, manifest.version, path, manifest)


def verify_file(path: Path, record: FileRecord) -> None:
    if not path.is_file():
        raise RepositoryError(f"{path}: listed in the manifest but missing")
    size = path.stat().st_size
    if size != record.size:
        raise RepositoryError(
            f"{path}: {size} bytes, the manifest says {record.size} (truncated or replaced)"
        )
    if sha256_file(path) != record.sha256:
        raise RepositoryError(f"{path}: SHA-256 does not match the manifest (file was modified)")


def _version_number(version: int | str) -> int:
    try:
        number = int(version)
    except ValueError:
        raise RepositoryError(f"version {version!r} is not a positive integer or 'latest'") from None
    if number < 1:
        raise RepositoryError(f"version {version!r} is not a positive integer or 'latest'")
    return number


# Version labels (as TF Serving's): REPO/NAME/labels.json maps names such as "stable" to versions.
LABELS = "labels.json"
RESERVED_LABELS = ("", "latest")


def check_label(label: str) -> str:
    if label in RESERVED_LABELS or label.isdecimal() or not label.replace("-", "").replace("_", "").isalnum():
        raise RepositoryError(
            f"label {label!r}: expected letters, digits, '-' or '_', not a number and not 'latest'"
        )
    return label


def read_labels(model_dir: Path) -> dict[str, int]:
    """The labels of a model ({} without a labels file); a malformed file is a RepositoryError."""
    path = model_dir / LABELS
    try:
        with readable():
            return parse_labels(path.read_text(), str(path))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RepositoryError(f"{path}: not readable ({exc})") from None


def parse_labels(text: str, source: str) -> dict[str, int]:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RepositoryError(f"{source}: not a JSON object of labels ({exc})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in raw.values()
    ):
        raise RepositoryError(f'{source}: expected {{"label": version number, ...}}, got {raw!r}')
    return {check_label(label): version for label, version in raw.items()}


def labels_text(labels: dict[str, int]) -> str:
    return json.dumps(dict(sorted(labels.items())), indent=2) + "\n"


# Traffic (`vae traffic`): REPO/NAME/traffic.json says how calls that name no version are split
# between versions (by number or label, weighted), and which version, if any, gets a mirrored
# copy of each such call off the caller's path. Without the file such calls go to the latest.
TRAFFIC = "traffic.json"


@dataclass(frozen=True)
class TrafficSplit:
    weights: dict[str, int]  # version number or label → relative weight (> 0)
    shadow: str = ""  # version number or label; "" for none

    @classmethod
    def parse(cls, text: str, source: str) -> TrafficSplit:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise RepositoryError(f"{source}: not a JSON traffic split ({exc})") from None
        weights = raw.get("weights") if isinstance(raw, dict) else None
        shadow = raw.get("shadow", "") if isinstance(raw, dict) else ""
        if (
            not isinstance(weights, dict)
            or not weights
            or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in weights.values())
            or not isinstance(shadow, str)
        ):
            raise RepositoryError(
                f'{source}: expected {{"weights": {{"VERSION or LABEL": weight > 0, ...}}, "shadow": '
                f'"VERSION or LABEL" or ""}}, got {raw!r}'
            )
        return cls({check_key(k): int(w) for k, w in weights.items()}, check_key(shadow) if shadow else "")

    def text(self) -> str:
        return json.dumps({"weights": self.weights, "shadow": self.shadow}, indent=2) + "\n"

    def describe(self) -> str:
        shares = ", ".join(f"{key} {share:.0%}" for key, share in self.shares().items())
        return shares + (f", shadow {self.shadow}" if self.shadow else "")

    def shares(self) -> dict[str, float]:
        """Each key's share of the calls, 0 to 1."""
        total = sum(self.weights.values())
        return {key: weight / total for key, weight in self.weights.items()}


def check_key(key: str) -> str:
    """A traffic key: a version number or a label."""
    return key if key.isdecimal() and int(key) > 0 else check_label(key)


def read_traffic(model_dir: Path) -> TrafficSplit | None:
    path = model_dir / TRAFFIC
    try:
        with readable():
            return TrafficSplit.parse(path.read_text(), str(path))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RepositoryError(f"{path}: not readable ({exc})") from None
