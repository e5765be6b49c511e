"""vae.v1's VaeService over gRPC: thin translations between messages and the data plane.

Each handler decodes tensors (vaeserve.codec), calls the ServedModel, and encodes the result;
every handler, EncodeStream's included, runs in ``grpc_calls``' wrapper, whose statuses are
``service.policy``'s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from vaeserve import __version__
from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.codec import read_tensor, to_tensor
from vaeserve.service.autoencoders import LatentOptions, Served, options_for
from vaeserve.service.dataplane import ModelRegistry
from vaeserve.service.grpc_calls import rpc, stream_rpc
from vaeserve.service.metrics import Metrics
from vaeserve.service.shared_memory import SharedMemoryRegions
from vaeserve.service.wire import Received, Reply, field_number

log = logging.getLogger(__name__)

PROTOCOL = "v1"
ENCODE_FIELDS = {name: field_number(vae_pb2.EncodeResponse, name) for name in ("mean", "stddev", "z")}


def _seed(request) -> int | None:
    return request.seed if request.HasField("seed") else None


def _options(model: Served, request) -> tuple[LatentOptions, ...]:
    """An imported autoencoder's options from the request (none for a VAE, which refuses them)."""
    given = request.autoencoder
    options = LatentOptions(given.pipeline_latents, given.tile_size, given.latent_height, given.latent_width)
    return options_for(model, options)


# The tensor whose first dimension counts a response's rows, for the rows-processed metric.
_ROWS_FIELD = {
    vae_pb2.EncodeResponse: "mean",
    vae_pb2.DecodeResponse: "probs",
    vae_pb2.ReconstructResponse: "latents",
    vae_pb2.SamplePriorResponse: "latents",
    vae_pb2.ScoreResponse: "elbo",
}


def _rows(response) -> int:
    """Rows a response carries (none when its outputs went to shared memory)."""
    if isinstance(response, Reply):
        return response.rows
    field = _ROWS_FIELD.get(type(response))
    shape = getattr(response, field).shape if field else ()
    if not shape and isinstance(response, vae_pb2.DecodeResponse):
        shape = response.images.shape  # an imported autoencoder's
    return shape[0] if shape else 0


def _rpc(method: str) -> Callable:
    return rpc(method, PROTOCOL, _rows)


def _ref(model: Served) -> vae_pb2.ModelRef:
    return vae_pb2.ModelRef(name=model.version.name, version=model.version.version)


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, registry: ModelRegistry, metrics: Metrics, regions: SharedMemoryRegions) -> None:
        self.registry = registry
        self.metrics = metrics
        self.regions = regions

    @_rpc("Encode")
    async def Encode(self, received: Received, context) -> Reply | vae_pb2.EncodeResponse:
        """The request's tensor bytes arrive as a view and the answer's leave from the arrays
        (service.wire, registered by the server for this method)."""
        data = received.tensors[0] if received.tensors else None
        request = received.message
        model, out = await self._encoded(request, data)
        if request.HasField("output_shared_memory"):
            return self._in_shared_memory(request, model, out)
        tensors = tuple((ENCODE_FIELDS[name], array) for name, array in out.items())
        return Reply(vae_pb2.EncodeResponse(model=_ref(model)), tensors)

    @stream_rpc("EncodeStream", PROTOCOL, _rows)
    async def EncodeStream(self, request: vae_pb2.EncodeRequest) -> vae_pb2.EncodeResponse:
        """One response per request, in order; an error ends the stream with its status."""
        model, out = await self._encoded(request)
        if request.HasField("output_shared_memory"):
            return self._in_shared_memory(request, model, out)
        tensors = {name: to_tensor(array) for name, array in out.items()}
        return vae_pb2.EncodeResponse(**tensors, model=_ref(model))

    async def _encoded(self, request: vae_pb2.EncodeRequest, data: memoryview | None = None):
        model = self.registry.resolve(request.model, request.version)
        inputs = read_tensor(request.inputs, "inputs", model.pixels, self.regions.read, data)
        return model, await model.encode(inputs, request.sample, _seed(request), *_options(model, request))

    def _in_shared_memory(self, request, model, out: dict) -> vae_pb2.EncodeResponse:
        tensors = self.regions.write(request.output_shared_memory, out, "output_shared_memory")
        return vae_pb2.EncodeResponse(**tensors, model=_ref(model))

    @_rpc("Decode")
    async def Decode(self, request: vae_pb2.DecodeRequest, context) -> vae_pb2.DecodeResponse:
        model = self.registry.resolve(request.model, request.version)
        latents = read_tensor(request.latents, "latents", model.latent_rows, self.regions.read)
        out = await model.decode(latents, request.sample, _seed(request), *_options(model, request))
        tensors = {name: to_tensor(array) for name, array in out.items()}  # probs (samples), or images
        return vae_pb2.DecodeResponse(**tensors, model=_ref(model))

    @_rpc("Reconstruct")
    async def Reconstruct(self, request: vae_pb2.ReconstructRequest, context) -> vae_pb2.ReconstructResponse:
        model = self.registry.resolve(request.model, request.version)
        inputs = read_tensor(request.inputs, "inputs", model.pixels, self.regions.read)
        out = await model.reconstruct(inputs, request.use_mean, _seed(request), *_options(model, request))
        tensors = {
            name: to_tensor(array) for name, array in out.items()
        }  # probs, samples, or images; latents
        return vae_pb2.ReconstructResponse(**tensors, model=_ref(model))

    @_rpc("SamplePrior")
    async def SamplePrior(self, request: vae_pb2.SamplePriorRequest, context) -> vae_pb2.SamplePriorResponse:
        model = self.registry.resolve(request.model, request.version)
        out = await model.sample_prior(model.count(request.count), _seed(request), *_options(model, request))
        tensors = {
            name: to_tensor(array) for name, array in out.items()
        }  # latents; probs, samples, or images
        return vae_pb2.SamplePriorResponse(**tensors, model=_ref(model))

    @_rpc("Score")
    async def Score(self, request: vae_pb2.ScoreRequest, context) -> vae_pb2.ScoreResponse:
        model = self.registry.resolve(request.model, request.version)
        inputs = read_tensor(request.inputs, "inputs", model.pixels, self.regions.read)
        out = await model.score(inputs, request.iw_samples, _seed(request), request.row_offset)
        tensors = {name: to_tensor(array) for name, array in out.items()}
        return vae_pb2.ScoreResponse(
            **tensors, model=_ref(model), iw_samples=model.iw_samples(request.iw_samples)
        )

    @_rpc("GetModelInfo")
    async def GetModelInfo(
        self, request: vae_pb2.GetModelInfoRequest, context
    ) -> vae_pb2.GetModelInfoResponse:
        models = [vae_pb2.ModelInfo(**dataclasses.asdict(m)) for m in self.registry.describe(request.model)]
        return vae_pb2.GetModelInfoResponse(models=models, server_version=__version__)

    @_rpc("RegisterSharedMemory")
    async def RegisterSharedMemory(
        self, request: vae_pb2.RegisterSharedMemoryRequest, context
    ) -> vae_pb2.RegisterSharedMemoryResponse:
        self.regions.register(request.name, request.key, request.byte_size)
        log.info("shared memory: registered %r (%s, %d bytes)", request.name, request.key, request.byte_size)
        return vae_pb2.RegisterSharedMemoryResponse()

    @_rpc("UnregisterSharedMemory")
    async def UnregisterSharedMemory(
        self, request: vae_pb2.UnregisterSharedMemoryRequest, context
    ) -> vae_pb2.UnregisterSharedMemoryResponse:
        self.regions.unregister(request.name)
        log.info("shared memory: unregistered %r", request.name)
        return vae_pb2.UnregisterSharedMemoryResponse()
