"""A version's ``manifest.json``, as one typed record: read, validated and written here only.

``vae export`` builds a ``Manifest`` and writes it; the repository loader, the service, the
embedding tool, the evaluator and the benchmarks read it through this record. Keys a newer
vaeserve added and this one does not know are kept and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vaeserve.errors import RepositoryError
from vaeserve.tiling import Tiling

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ROLES = ("encoder", "decoder")


@dataclass(frozen=True)
class FileRecord:
    """A file of the version: its name in the folder, size and SHA-256 (and, for the fp32
    graphs, their inputs' and outputs' names, dtypes and shapes)."""

    file: str
    size: int
    sha256: str
    signature: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> FileRecord:
        name = raw["file"]
        # A name in the version's own folder: "../1/encoder.onnx" would serve another folder's file.
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or PurePosixPath(name).name != name
            or "\\" in name
        ):
            raise ValueError(f"file {name!r} is not a file name in the version's folder")
        return cls(
            raw["file"],
            int(raw["size"]),
            raw["sha256"],
            {k: raw[k] for k in ("inputs", "outputs") if k in raw},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "sha256": self.sha256, **self.signature}


@dataclass(frozen=True)
class ImportedAutoencoder:
    """A latent-diffusion autoencoder imported from diffusers (``vae import --diffusers``): images
    [N, 3, H, W] in [−1, 1] to latents [N, C, H/f, W/f] and back, at any size the model takes."""

    diffusers_class: str  # AutoencoderKL or AutoencoderTiny
    config: dict[str, Any]  # the folder's config.json, as diffusers read it
    latent_channels: int
    downscale: int  # f: pixels per latent along a side
    scaling_factor: float  # a pipeline's latents are (z − shift_factor) · scaling_factor
    shift_factor: float
    stochastic: bool  # AutoencoderKL: a Gaussian q(z|x); AutoencoderTiny: latents, stddev 0
    tiling: Tiling
    image_channels: int = 3
    pixel_range: tuple[float, float] = (-1.0, 1.0)
    source: dict[str, Any] = field(default_factory=dict)  # folder, weights' SHA-256, diffusers' version

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> ImportedAutoencoder:
        return cls(
            diffusers_class=str(raw["diffusers_class"]),
            config=dict(raw["config"]),
            latent_channels=int(raw["latent_channels"]),
            downscale=int(raw["downscale"]),
            scaling_factor=float(raw["scaling_factor"]),
            shift_factor=float(raw["shift_factor"]),
            stochastic=bool(raw["stochastic"]),
            tiling=Tiling.parse(raw["tiling"]),
            image_channels=int(raw.get("image_channels", 3)),
            pixel_range=tuple(float(v) for v in raw.get("pixel_range", (-1.0, 1.0))),
            source=dict(raw.get("source", {})),
        )

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw.update(tiling=self.tiling.to_dict(), pixel_range=list(self.pixel_range))
        return raw

    def brief(self) -> dict[str, Any]:
        """What the console needs to draw it: its class, latents, factors and tile."""
        return {
            "diffusers_class": self.diffusers_class,
            "latent_channels": self.latent_channels,
            "downscale": self.downscale,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "stochastic": self.stochastic,
            "sample_tile": self.tiling.sample_tile,
            "latent_tile": self.tiling.latent_tile,
        }


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    input_size: int
    latent_size: int
    image_shape: tuple[int, ...]
    graphs: dict[str, FileRecord]  # by role: encoder, decoder
    binarization: str = "none"  # how training prepared pixels; exports before it existed: none
    likelihood: str = "bernoulli"  # p(x|z); exports before continuous-bernoulli: bernoulli
    likelihood_options: dict[str, Any] = field(default_factory=dict)  # discretized-logistic: components
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # int8, fp16: files and changes
    # p(z) when it is not N(0, I): a Gaussian mixture's file (vaeserve.prior); None, the standard normal
    prior: FileRecord | None = None
    # The networks, the prior and the posterior, as trained (exports before it: {})
    architecture: dict[str, Any] = field(default_factory=dict)
    vaeserve_version: str = ""
    created: str = ""
    opset: int | None = None
    exporter: str = ""
    parity: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    score_reference: dict[str, Any] = field(default_factory=dict)
    source_checkpoint: dict[str, Any] = field(default_factory=dict)
    # An imported latent-diffusion autoencoder; None for the VAEs vaeserve trains
    autoencoder: ImportedAutoencoder | None = None
    schema_version: int = SCHEMA_VERSION
    unknown: dict[str, Any] = field(default_factory=dict)  # keys of a newer vaeserve, kept

    # -- reading and writing ----------------------------------------------------------------------
    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise RepositoryError(f"{path}: no manifest; not a model version folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"{path}: corrupt manifest ({exc})") from None
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: object, where: Path | str = MANIFEST) -> Manifest:
        """A manifest's JSON object, validated: RepositoryError saying what is wrong."""
        if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
            found = raw.get("schema_version") if isinstance(raw, dict) else None
            raise RepositoryError(
                f"{where}: manifest schema version {found!r}, this vaeserve reads {SCHEMA_VERSION}"
            )
        missing = {"name", "version", "input_size", "latent_size", "image_shape", "graphs"} - set(raw)
        if missing:
            raise RepositoryError(f"{where}: manifest lacks {sorted(missing)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        try:
            values.update(
                version=int(raw["version"]),
                input_size=int(raw["input_size"]),
                latent_size=int(raw["latent_size"]),
                image_shape=tuple(int(d) for d in raw["image_shape"]),
                graphs={role: FileRecord.parse(raw["graphs"][role]) for role in ROLES},
            )
            if raw.get("prior") is not None:
                values["prior"] = FileRecord.parse(raw["prior"])
            if raw.get("autoencoder") is not None:
                values["autoencoder"] = ImportedAutoencoder.parse(raw["autoencoder"])
            for variant in raw.get("variants", {}).values():
                [FileRecord.parse(variant[role]) for role in ROLES]
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
        return cls(**values, unknown={k: v for k, v in raw.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown"}
        raw.update(
            image_shape=list(self.image_shape),
            graphs={r: g.to_dict() for r, g in self.graphs.items()},
            prior=None if self.prior is None else self.prior.to_dict(),
            autoencoder=None if self.autoencoder is None else self.autoencoder.to_dict(),
        )
        return {**raw, **self.unknown}

    def write(self, folder: Path) -> None:
        """Into a staging folder (export renames the whole folder into place)."""
        (folder / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # -- what readers ask ---------------------------------------------------------------------------
    def files(self) -> list[FileRecord]:
        """Every file the version holds, fp32 graphs and variants, for verification."""
        records = [self.graphs[role] for role in ROLES]
        if self.prior is not None:
            records.append(self.prior)
        for variant in self.variants.values():
            records += [FileRecord.parse(variant[role]) for role in ROLES]
        return records

    def graph_file(self, role: str, variant: str = "fp32") -> str | None:
        """The file of ``role`` in ``variant``; None when the version has no such variant."""
        if variant == "fp32":
            return self.graphs[role].file
        found = self.variants.get(variant)
        return found[role]["file"] if found else None

    @property
    def dataset(self) -> str:
        """The dataset the model was trained on (its name in vaeserve.datasets)."""
        return self.training["dataset"]

    def evaluation_metrics(self) -> dict[str, float]:
        """The test evaluation's numbers (ELBO, NLL, ...), by name."""
        return {k: float(v) for k, v in self.evaluation.items() if isinstance(v, int | float)}

    def brief(self) -> dict[str, Any]:
        """What a person reads first about a version (the console's model list): its data and
        shape, how it was trained, its test scores, export parity and checksum prefixes; the
        test set's Score percentiles, to place a new input among them; per-dimension activity."""
        evaluation = self.evaluation
        return {
            "dataset": self.training.get("dataset", ""),
            "preset": self.training.get("preset", ""),
            "epochs": self.training.get("epochs"),
            "likelihood": self.likelihood,
            "binarization": self.binarization,
            "input_size": self.input_size,
            "image_shape": list(self.image_shape),
            "latent_size": self.latent_size,
            "architecture": self.architecture.get("name", "mlp"),
            "family": "autoencoder" if self.autoencoder is not None else "vae",
            "autoencoder": self.autoencoder.brief() if self.autoencoder is not None else None,
            "prior": self.architecture.get("prior", "standard-normal"),
            "test": {
                key: evaluation[key]
                for key in ("elbo", "elbo_stderr", "nll", "nll_stderr", "iw_samples", "active_units")
                if key in evaluation
            },
            "unit_activity": evaluation.get("unit_activity", []),
            "parity_max_abs_diff": max(self.parity.get("max_abs_diff", {}).values(), default=None),
            "created": self.created,
            "vaeserve_version": self.vaeserve_version,
            "variants": ["fp32", *sorted(self.variants)],
            "sha256": {role: record.sha256[:12] for role, record in self.graphs.items()},
            "score_reference": self.score_reference,
        }

    def reference_metrics(self) -> dict[str, float]:
        """The test set's Score percentiles as metrics, ``ood_score_p0.5`` and so on."""
        metrics = {}
        for name, percentiles in self.score_reference.get("percentiles", {}).items():
            metrics.update({f"{name}_p{p}": float(v) for p, v in percentiles.items()})
        return metrics
