"""The Open Inference Protocol's GRPCInferenceService: a thin translation onto the data plane.

Inputs come as ``raw_input_contents`` (bytes, one entry per input) or typed ``contents``;
the response answers in the form the request used. Every handler runs in
``grpc_calls.rpc``, as vae.v1's do.
"""

from __future__ import annotations

from collections.abc import Callable

from vaeserve import __version__
from vaeserve._proto import grpc_predict_v2_pb2 as pb
from vaeserve._proto import grpc_predict_v2_pb2_grpc as pb_grpc
from vaeserve.errors import RequestError
from vaeserve.service.grpc_calls import rpc
from vaeserve.service.metrics import Metrics
from vaeserve.service.oip import tensors
from vaeserve.service.oip.endpoints import NO_PARAMS, Catalogue, Outputs, Params
from vaeserve.service.oip.repository_extension import RepositoryExtension
from vaeserve.service.wire import Received, Reply, field_number

PROTOCOL = "oip-grpc"
NAME = "vaeserve"
EXTENSIONS = ("binary_tensor_data", "parameters")
RAW_OUTPUTS = field_number(pb.ModelInferResponse, "raw_output_contents")


def _rows(response) -> int:
    """Rows an infer response carries (other responses: none), for the rows-processed metric."""
    if isinstance(response, Reply):
        return response.rows
    if isinstance(response, pb.ModelInferResponse) and response.outputs:
        return int(response.outputs[0].shape[0])
    return 0


def _rpc(method: str) -> Callable:
    return rpc(method, PROTOCOL, _rows)


def parameter(value: pb.InferParameter) -> object:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        catalogue: Catalogue,
        metrics: Metrics,
        ready: Callable[[], bool],
        repository: RepositoryExtension,
    ) -> None:
        self.catalogue = catalogue
        self.metrics = metrics
        self.ready = ready
        self.repository = repository

    @_rpc("ServerLive")
    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc("ServerReady")
    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    @_rpc("ModelReady")
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        ready = self.ready() and self.catalogue.ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @_rpc("ServerMetadata")
    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=NAME, version=__version__, extensions=EXTENSIONS)

    @_rpc("ModelMetadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        found = self.catalogue.metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=found["name"],
            versions=found["versions"],
            platform=found["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in found["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in found["outputs"]],
        )

    @_rpc("ModelInfer")
    async def ModelInfer(self, received: Received, context) -> Reply | pb.ModelInferResponse:
        """Raw input bytes arrive as views and raw outputs leave from the arrays (service.wire,
        registered by the server for this method)."""
        request = received.message
        endpoint = self.catalogue.resolve(request.model_name, request.model_version)
        raw = received.tensors if received.tensors is not None else request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise RequestError(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                "send one per input, in order (or every input's contents instead)"
            )
        given = (
            (t.name, t.datatype, t.shape, raw[i] if raw else _values(t)) for i, t in enumerate(request.inputs)
        )
        inputs = tensors.read_inputs(endpoint, given)
        params = (
            Params.parse({k: parameter(v) for k, v in request.parameters.items()})
            if request.parameters
            else NO_PARAMS
        )
        outputs = await endpoint.infer(inputs, params, [output.name for output in request.outputs])
        return _response(request, endpoint.version, outputs, raw=bool(raw))

    # -- the model repository extension (the interceptor has checked the admin token) ----------
    @_rpc("RepositoryIndex")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        rows = self.repository.index(request.repository_name, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    @_rpc("RepositoryModelLoad")
    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        await self.repository.load(request.repository_name, request.model_name, dict(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_rpc("RepositoryModelUnload")
    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        await self.repository.unload(request.repository_name, request.model_name, dict(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def _values(tensor: pb.ModelInferRequest.InferInputTensor):
    """The typed values of an input; none for a datatype no model here takes (read() says so)."""
    field = tensors.CONTENTS.get(tensor.datatype)
    return getattr(tensor.contents, field) if field else ()


def _response(
    request: pb.ModelInferRequest, version: str, outputs: Outputs, raw: bool
) -> Reply | pb.ModelInferResponse:
    """The outputs in the form the request used: raw bytes (written by service.wire) or typed."""
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    for name, array in outputs:
        tensor = response.outputs.add(**tensors.describe(name, array))
        if not raw:
            getattr(tensor.contents, tensors.contents_field(array)).extend(array.ravel().tolist())
    if not raw:
        return response
    return Reply(response, raw_field=RAW_OUTPUTS, raw_outputs=tuple(array for _, array in outputs))
