"""The loaded models as the Open Inference Protocol sees them: five OIP models per model.

| OIP model          | inputs                          | outputs                              |
|--------------------|---------------------------------|--------------------------------------|
| NAME-encoder       | x [N, D] FP32 in [0, 1] or UINT8 | mean, stddev [N, M] (+ z with sample) |
| NAME-decoder       | z [N, M] FP32                   | probs [N, D] (+ samples with sample)  |

(A model whose rows are images also takes x as [N, C, H, W]; one whose graphs take images, a
conv model, shows x so and answers probs and samples as [N, C, H, W].)

| NAME-reconstruct   | x as above                      | probs, samples, latents               |
| NAME-sample-prior  | count [1] INT64                 | latents, probs, samples               |
| NAME-score         | x as above                      | elbo, log_px, complexity_bits, ood_score [N] |

An imported latent-diffusion autoencoder (service.autoencoders) has the same five, of images of
any size: x [N, 3, H, W] (UINT8 0-255, FP32 or FP16 in [−1, 1]) → mean, stddev (+ z) [N, C, H/f,
W/f]; z [N, C, h, w] → images [N, 3, f·h, f·w]; reconstruct → images, latents; sample-prior →
latents, images; its score is refused (UNIMPLEMENTED, HTTP 501). Parameters pipeline_latents,
tile_size, and sample-prior's height and width.

Every version of NAME is a version of each ("1", "2"; empty: the latest). Both OIP front ends
(gRPC and HTTP) turn their tensors into numpy (``tensors``) and call ``infer`` here, which
runs the same ``ServedModel`` methods as vae.v1: one data plane, the same batching, limits,
seeds and results.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vaeserve.errors import ModelNotFoundError, RequestError
from vaeserve.rows import Rows
from vaeserve.service.autoencoders import (
    DEFAULT_OPTIONS,
    LatentOptions,
    Served,
    ServedAutoencoder,
    options_for,
)
from vaeserve.service.dataplane import ModelRegistry, ServedModel
from vaeserve.service.metrics import CALL_MODEL
from vaeserve.service.shadow import SHADOW

PLATFORM = "vaeserve"
# Request parameters clients of other servers send that mean nothing here; accepted and ignored.
IGNORED_PARAMETERS = frozenset({"binary_data_output", "content_type", "headers", "priority", "timeout"})


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as metadata shows it; ``datatypes`` are those accepted, the first the one shown."""

    name: str
    datatypes: tuple[str, ...]
    shape: tuple[int, ...]  # -1: the batch, any size

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatypes[0], "shape": list(self.shape)}


@dataclass(frozen=True)
class Input:
    spec: TensorSpec
    rows: Rows | None  # None: a fixed-shape integer (count), checked by its model


@dataclass(frozen=True)
class Params:
    """A request's parameters: the same meaning as vae.v1's fields of those names."""

    seed: int | None = None
    sample: bool = False
    use_mean: bool = False
    iw_samples: int = 0
    row_offset: int = 0
    latent: LatentOptions = DEFAULT_OPTIONS  # an imported autoencoder's (service.autoencoders)

    @classmethod
    def parse(cls, values: Mapping[str, object]) -> Params:
        if not values:
            return NO_PARAMS
        unknown = set(values) - set(NUMBERS) - set(FLAGS) - IGNORED_PARAMETERS
        if unknown:
            raise RequestError(
                f"parameters {sorted(unknown)}: not known here; expected seed (int64 >= 0), "
                "sample (bool), use_mean (bool), iw_samples and row_offset (int >= 0, NAME-score); "
                "for an imported autoencoder pipeline_latents (bool), tile_size (pixels), height and "
                "width (NAME-sample-prior's latents)"
            )
        numbers = {name: values.get(name) for name in NUMBERS}
        for name, value in numbers.items():
            if value is not None and (type(value) is not int or not 0 <= value < 2**64):
                raise RequestError(f"parameter {name}: {value!r}; expected an integer from 0 to 2**64 - 1")
        flags = {name: values.get(name, False) for name in FLAGS}
        for name, value in flags.items():
            if type(value) is not bool:
                raise RequestError(f"parameter {name}: {value!r}; expected true or false")
        latent = LatentOptions(
            flags.pop("pipeline_latents"),
            *(numbers.pop(name) or 0 for name in ("tile_size", "height", "width")),
        )
        return cls(
            numbers["seed"],
            iw_samples=numbers["iw_samples"] or 0,
            row_offset=numbers["row_offset"] or 0,
            latent=latent,
            **flags,
        )


NUMBERS = ("seed", "iw_samples", "row_offset", "tile_size", "height", "width")
FLAGS = ("sample", "use_mean", "pipeline_latents")


NO_PARAMS = Params()
NOTHING: frozenset[str] = frozenset()
Outputs = list[tuple[str, np.ndarray]]
Run = Callable[[ServedModel, dict[str, np.ndarray], Params, frozenset[str]], Awaitable[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class Kind:
    """One use of a model, as an OIP model ``NAME-suffix``."""

    suffix: str
    inputs: Callable[[ServedModel], tuple[Input, ...]]
    outputs: Callable[[ServedModel], tuple[TensorSpec, ...]]
    run: Run


def _x(model: ServedModel) -> tuple[Input, ...]:
    """Rows [N, D], or images [N, C, H, W] (shown so for a model whose graphs take images)."""
    return (Input(TensorSpec("x", ("FP32", "UINT8"), (-1, *model.row_shape)), model.pixels),)


def _z(model: ServedModel) -> tuple[Input, ...]:
    return (Input(TensorSpec("z", ("FP32",), (-1, model.version.latent_size)), model.latent_rows),)


def _count(model: ServedModel) -> tuple[Input, ...]:
    return (Input(TensorSpec("count", ("INT64",), (1,)), None),)


def _specs(model: ServedModel, *outputs: tuple[str, str, str]) -> tuple[TensorSpec, ...]:
    """(name, datatype, "D" or "M") → TensorSpec of shape [-1, *row] (images: [-1, C, H, W]) or [-1, M]."""
    size = {"D": model.row_shape, "M": (model.version.latent_size,)}
    return tuple(TensorSpec(name, (datatype,), (-1, *size[width])) for name, datatype, width in outputs)


async def _encode(model: ServedModel, inputs, params: Params, asked: frozenset[str]):
    return await model.encode(inputs["x"], params.sample or "z" in asked, params.seed)


async def _decode(model: ServedModel, inputs, params: Params, asked: frozenset[str]):
    return await model.decode(inputs["z"], params.sample or "samples" in asked, params.seed)


async def _reconstruct(model: ServedModel, inputs, params: Params, asked: frozenset[str]):
    return await model.reconstruct(inputs["x"], params.use_mean, params.seed)


async def _score(model: ServedModel, inputs, params: Params, asked: frozenset[str]):
    return await model.score(inputs["x"], params.iw_samples, params.seed, params.row_offset)


def _per_row(*names: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, ("FP32",), (-1,)) for name in names)


def _samples(model: ServedModel) -> tuple[str, str, str]:
    """uint8 0/1 from a Bernoulli model, float32 values in [0, 1] from the others."""
    return ("samples", model.likelihood.sample_dtype, "D")


async def _sample_prior(model: ServedModel, inputs, params: Params, asked: frozenset[str]):
    return await model.sample_prior(model.count(int(inputs["count"][0])), params.seed)


KINDS = (
    Kind(
        "encoder",
        _x,
        lambda m: _specs(m, ("mean", "FP32", "M"), ("stddev", "FP32", "M"), ("z", "FP32", "M")),
        _encode,
    ),
    Kind(
        "decoder",
        _z,
        lambda m: _specs(m, ("probs", "FP32", "D"), _samples(m)),
        _decode,
    ),
    Kind(
        "reconstruct",
        _x,
        lambda m: _specs(m, ("probs", "FP32", "D"), _samples(m), ("latents", "FP32", "M")),
        _reconstruct,
    ),
    Kind(
        "sample-prior",
        _count,
        lambda m: _specs(m, ("latents", "FP32", "M"), ("probs", "FP32", "D"), _samples(m)),
        _sample_prior,
    ),
    Kind("score", _x, lambda m: _per_row("elbo", "log_px", "complexity_bits", "ood_score"), _score),
)


# -- an imported autoencoder's (service.autoencoders): images and latents of any size --------------
def _images_in(model: ServedAutoencoder) -> tuple[Input, ...]:
    return (Input(TensorSpec("x", ("FP32", "UINT8", "FP16"), (-1, *model.row_shape)), model.pixels),)


def _latents_in(model: ServedAutoencoder) -> tuple[Input, ...]:
    return (Input(TensorSpec("z", ("FP32", "FP16"), (-1, *model.latent_shape)), model.latent_rows),)


def _image_specs(model: ServedAutoencoder, *names: str) -> tuple[TensorSpec, ...]:
    """Outputs by name: images [-1, 3, -1, -1], the rest latents [-1, C, -1, -1]."""
    return tuple(
        TensorSpec(name, ("FP32",), (-1, *(model.row_shape if name == "images" else model.latent_shape)))
        for name in names
    )


async def _encode_images(model: ServedAutoencoder, inputs, params: Params, asked: frozenset[str]):
    return await model.encode(inputs["x"], params.sample or "z" in asked, params.seed, params.latent)


async def _decode_latents(model: ServedAutoencoder, inputs, params: Params, asked: frozenset[str]):
    return await model.decode(inputs["z"], params.sample, params.seed, params.latent)


async def _reconstruct_images(model: ServedAutoencoder, inputs, params: Params, asked: frozenset[str]):
    return await model.reconstruct(inputs["x"], params.use_mean, params.seed, params.latent)


async def _sample_latents(model: ServedAutoencoder, inputs, params: Params, asked: frozenset[str]):
    return await model.sample_prior(model.count(int(inputs["count"][0])), params.seed, params.latent)


AUTOENCODER_KINDS = (
    Kind("encoder", _images_in, lambda m: _image_specs(m, "mean", "stddev", "z"), _encode_images),
    Kind("decoder", _latents_in, lambda m: _image_specs(m, "images"), _decode_latents),
    Kind("reconstruct", _images_in, lambda m: _image_specs(m, "images", "latents"), _reconstruct_images),
    Kind("sample-prior", _count, lambda m: _image_specs(m, "latents", "images"), _sample_latents),
    Kind("score", _images_in, lambda m: (), _score),  # refused: the model defines no likelihood
)
FAMILY_KINDS = {"vae": KINDS, "autoencoder": AUTOENCODER_KINDS}


class Endpoint:
    """One OIP model at one loaded version: its inputs and outputs, built once, since every
    call looks them up."""

    def __init__(self, name: str, model: Served, kind: Kind) -> None:
        self.name = name
        self.model = model
        self.kind = kind
        self.version = str(model.version.version)
        self.inputs = {i.spec.name: i for i in kind.inputs(model)}
        self.outputs = kind.outputs(model)
        self.output_names = [s.name for s in self.outputs]

    def input(self, name: str) -> Input:
        found = self.inputs.get(name)
        if found is None:
            expected = ", ".join(_describe(i.spec) for i in self.inputs.values())
            raise RequestError(f"input {name!r}: {self.name} has no such input; it takes {expected}")
        return found

    async def infer(self, inputs: dict[str, np.ndarray], params: Params, asked: list[str]) -> Outputs:
        """Run on decoded inputs; the outputs asked for (all it gives when none), in order."""
        if len(inputs) != len(self.inputs):
            missing = [_describe(i.spec) for name, i in self.inputs.items() if name not in inputs]
            raise RequestError(f"{self.name}: missing input {', '.join(missing)}")
        wanted = frozenset(asked) if asked else NOTHING
        if not wanted.issubset(self.output_names):
            unknown = sorted(wanted.difference(self.output_names))
            names = ", ".join(self.output_names)
            raise RequestError(f"outputs {unknown}: {self.name} has no such output; its outputs: {names}")
        options_for(self.model, params.latent)  # a VAE asked for an autoencoder's options refuses
        out = await self.kind.run(self.model, inputs, params, wanted)
        return [(name, out[name]) for name in (asked or [n for n in self.output_names if n in out])]

    def metadata(self, versions: list[str]) -> dict:
        return {
            "name": self.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [i.spec.metadata() for i in self.inputs.values()],
            "outputs": [s.metadata() for s in self.outputs],
        }


def _describe(spec: TensorSpec) -> str:
    return f"{spec.name} {list(spec.shape)} {' or '.join(spec.datatypes)}"


class Catalogue:
    """Resolves OIP model names (``NAME-suffix``) and versions to endpoints, each built once."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.by_suffix = {f"-{kind.suffix}": kind for kind in KINDS}
        self.family_kinds = {
            family: {f"-{kind.suffix}": kind for kind in kinds} for family, kinds in FAMILY_KINDS.items()
        }
        # (name, version as asked) → its endpoint; only names that resolved are kept, and only
        # while the registry stays as it was (a poll may load, retire or relabel versions).
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        self.generation = registry.generation

    def resolve(self, name: str, version: str) -> Endpoint:
        if self.generation != self.registry.generation:
            self.endpoints.clear()
            self.generation = self.registry.generation
        found = self.endpoints.get((name, version))
        if found is None:
            found = self._endpoint(name, version)
            # Other spellings ("01") are not kept, so the cache stays bounded; nor is what a
            # traffic split routes, which each call draws again (ModelRegistry.resolve).
            routed = not version and found.model.version.name in self.registry.traffic
            if version in ("", "latest") and not routed:
                self.endpoints[name, version] = found
        else:
            SHADOW.set(None)  # a cached endpoint is never a routed call's: nothing to mirror
        CALL_MODEL.set(found.model.version.name)
        return found

    def _endpoint(self, name: str, version: str) -> Endpoint:
        for suffix, kind in self.by_suffix.items():
            base = name.removesuffix(suffix)
            if base != name and (base in self.registry.models or base in self.registry.evicted):
                model = self.registry.resolve(base, version)
                kind = self.family_kinds[model.family][suffix]
                # One endpoint per loaded version, whichever way a request names it.
                key = (name, str(model.version.version))
                return self.endpoints.get(key) or self.endpoints.setdefault(key, Endpoint(name, model, kind))
        raise ModelNotFoundError(f"model {name!r} is not served here; models: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [f"{base}{suffix}" for base in sorted(self.registry.models) for suffix in self.by_suffix]

    def versions(self, endpoint: Endpoint) -> list[str]:
        return [str(v) for v in sorted(self.registry.models[endpoint.model.version.name])]

    def metadata(self, name: str, version: str) -> dict:
        endpoint = self.resolve(name, version)
        return endpoint.metadata(self.versions(endpoint))

    def ready(self, name: str, version: str) -> bool:
        try:
            self.resolve(name, version)
        except ModelNotFoundError:
            return False
        return True
