"""The Open Inference Protocol over HTTP/REST: an aiohttp app on the gRPC server's event loop.

Routes (KServe's REST paths): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``,
``/v2/models/{model}[/versions/{version}]``, ``.../ready``, ``POST .../infer`` and
``GET /v2/openapi.json``; and the web console's (service.console). Infer bodies are JSON, or
JSON followed by raw tensor bytes (the binary tensor data extension:
``Inference-Header-Content-Length`` gives the JSON's length,
an input's ``binary_data_size`` parameter its bytes; outputs asked for with ``binary_data``
or ``binary_data_output`` come back the same way). Errors are ``{"error": "..."}`` with the
code ``service.policy`` gives them, and the tokens each route needs are policy's too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vaeserve import __version__
from vaeserve.errors import ConfigError, ModelNotFoundError, RequestError, TensorError, VaeError
from vaeserve.service import policy, tracing
from vaeserve.service.console.routes import Console
from vaeserve.service.errors import BodyTimeoutError, ClientGoneError, ForeignOriginError, OverloadedError
from vaeserve.service.metrics import Metrics
from vaeserve.service.oip import tensors
from vaeserve.service.oip.endpoints import Catalogue, Endpoint, Outputs, Params
from vaeserve.service.oip.grpc_servicer import EXTENSIONS, NAME
from vaeserve.service.oip.openapi import document
from vaeserve.service.oip.repository_extension import RepositoryExtension
from vaeserve.service.residency import NotResidentError

log = logging.getLogger("vaeserve.service")
PROTOCOL = "oip-http"
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON = "application/json"
WHERE = "header 'Authorization: Bearer <token>'"
MAX_HEADER_BYTES = 8190
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    catalogue: Catalogue,
    metrics: Metrics,
    ready: Callable[[], bool],
    tokens: policy.Tokens,
    max_body_bytes: int,
    max_in_flight: int,
    repository: RepositoryExtension,
    console: Console,
    *,
    body_idle_s: float = 75.0,
    browsers: BrowserPolicy,
) -> web.Application:
    routes = Routes(catalogue, ready, repository, console.serves_page)
    body = BodyLimits(max_body_bytes, body_idle_s)
    guard = Guard(metrics, tokens, max_in_flight, body, routes.name_model, browsers)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[guard.middleware])
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version}"
    app.router.add_get("/v2/health/live", routes.live, name="ServerLive")
    app.router.add_get("/v2/health/ready", routes.server_ready, name="ServerReady")
    app.router.add_get("/v2", routes.server_metadata, name="ServerMetadata")
    app.router.add_get("/v2/openapi.json", routes.openapi, name="OpenAPI")
    for prefix, suffix in ((model, ""), (versioned, "Version")):
        app.router.add_get(prefix, routes.model_metadata, name=f"ModelMetadata{suffix}")
        app.router.add_get(f"{prefix}/ready", routes.model_ready, name=f"ModelReady{suffix}")
        app.router.add_post(f"{prefix}/infer", routes.infer, name=f"ModelInfer{suffix}")
    app.router.add_post("/v2/repository/index", routes.repository_index, name="RepositoryIndex")
    repository_model = "/v2/repository/models/{model}"
    app.router.add_post(f"{repository_model}/load", routes.repository_load, name="RepositoryModelLoad")
    app.router.add_post(f"{repository_model}/unload", routes.repository_unload, name="RepositoryModelUnload")
    console.add_routes(app)
    return app


def json_response(body: dict | list, status: int = 200, **headers: str) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON, headers=headers)


def error(status: int, message: str, **headers: str) -> web.Response:
    return json_response({"error": message}, status, **headers)


# The slowest body a request may send, after --http-idle-s: 64 KiB/s (the largest body, 64 MiB by
# default, then has about 17 minutes).
MIN_BODY_BYTES_PER_S = 64 * 1024


@dataclass(frozen=True)
class BodyLimits:
    """How large a request body may be, and how long it may take to arrive: --http-idle-s plus
    its length at MIN_BODY_BYTES_PER_S. A body that trickles (slowloris) is cut off there, and is
    read before the request takes an in-flight slot, so trickling bodies never fill them."""

    max_bytes: int
    idle_s: float

    def seconds(self, length: int | None) -> float:
        return self.idle_s + (self.max_bytes if length is None else length) / MIN_BODY_BYTES_PER_S

    async def read(self, request: web.Request) -> None:
        """The whole body, into aiohttp's cache (handlers' ``request.read()`` returns it), within
        its time; 413 before reading when its declared length is over the limit."""
        length = request.content_length
        if length is not None and length > self.max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_bytes, actual_size=length)
        if not request.body_exists:
            return
        seconds = self.seconds(length)
        try:
            await asyncio.wait_for(request.read(), seconds)
        except TimeoutError:
            raise BodyTimeoutError(
                f"the request body did not arrive within {seconds:.0f} s (--http-idle-s "
                f"{self.idle_s:g} plus {MIN_BODY_BYTES_PER_S // 1024} KiB/s of its length)"
            ) from None


@dataclass(frozen=True)
class BrowserPolicy:
    """What a web page may make this server do. DNS rebinding points an attacker's host name at
    the server's address, so that the attacker's page calls it as its own origin: the Host header
    then carries that name, and a Host that is a name must be one the server answers to (an IP
    address cannot be rebound). A page of another site (or another port) can still send "simple"
    requests, a text/plain POST or a form, without CORS's preflight: those carry an ``Origin``
    other than the server's own, or ``Sec-Fetch-Site: cross-site``/``same-site``, and are
    refused. Clients that are not browsers (curl, tritonclient, probes) send neither."""

    names: frozenset[str] | None  # lower-case host names accepted; None: any

    @classmethod
    def of(cls, allowed_hosts: str, listen_host: str) -> BrowserPolicy:
        listed = {n.strip().lower() for n in allowed_hosts.split(",") if n.strip()}
        if "*" in listed or (not listed and not _loopback(listen_host)):
            return cls(None)
        return cls(frozenset(listed | {"localhost"}))

    def check(self, request: web.Request) -> None:
        name = urllib.parse.urlsplit(f"//{request.host}").hostname or ""
        if self.names is not None and name not in self.names and not _is_address(name):
            raise ForeignOriginError(
                f"Host {name!r} is not a name this server answers to (it accepts IP addresses and "
                f"{', '.join(sorted(self.names))}; --allowed-hosts adds names)"
            )
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site", "")
        if site in ("cross-site", "same-site") or (
            origin is not None and urllib.parse.urlsplit(origin).netloc != request.host
        ):
            raise ForeignOriginError(
                f"a request from a page of another origin ({origin or site}) is refused: this "
                "server answers its own pages (the console) and clients that are not browsers"
            )


def _loopback(host: str) -> bool:
    return host == "localhost" or (_is_address(host) and ipaddress.ip_address(host).is_loopback)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """Every request's wrapper: the browser policy, the token, the body's size and time, the
    in-flight limit, errors as JSON, and metrics."""

    def __init__(
        self,
        metrics: Metrics,
        tokens: policy.Tokens,
        max_in_flight: int,
        body: BodyLimits,
        name_model: Callable[[web.Request], None],
        browsers: BrowserPolicy,
    ) -> None:
        self.metrics = metrics
        self.browsers = browsers
        self.tokens = tokens
        self.max_in_flight = max_in_flight
        self.body = body
        self.name_model = name_model  # the metrics' model label, for a call that ends in its body
        self.in_flight = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = self.metrics.started()
        route = request.match_info.route.name or "unknown"
        method = route.removesuffix("Version")
        with tracing.call(method, PROTOCOL, request.headers) as span:
            try:
                response, rows = await self._answer(request, handler, method)
            except asyncio.CancelledError:  # the client left: its work was cancelled, nobody to answer
                self.metrics.call(method, "499", started, 0, PROTOCOL)
                tracing.ended(span, "499", False, 0)
                raise
            except Exception as exc:
                response, rows = self._error(exc, request, method), 0
            tracing.ended(span, str(response.status), response.status < 400, rows)
        self.metrics.call(method, str(response.status), started, rows, PROTOCOL)
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, method: str
    ) -> tuple[web.StreamResponse, int]:
        self.browsers.check(request)
        self.tokens.check(method, request.headers.get("Authorization", ""), WHERE)
        if request.body_exists:
            self.name_model(request)
            try:
                await self.body.read(request)  # before a slot: a slow body holds none
            except ConnectionResetError:  # the client left mid-body: its failure, not the server's
                log.debug("%s %s: the client closed the connection", request.method, request.path)
                raise ClientGoneError("client closed the connection") from None
        probe = policy.credential(method) is policy.Credential.NONE  # probes still get an answer
        if self.in_flight >= self.max_in_flight and not probe:
            raise OverloadedError(
                f"server busy: {self.in_flight} requests in progress (limit {self.max_in_flight}); retry"
            )
        self.in_flight += 1
        try:
            try:
                response = await handler(request)
            except NotResidentError as missing:  # bounded residency: loaded for this call, which then runs
                await missing.loaded()
                response = await handler(request)
        except ConnectionResetError:  # the client left mid-request: its failure, not the server's
            log.debug("%s %s: the client closed the connection", request.method, request.path)
            raise ClientGoneError("client closed the connection") from None
        finally:
            self.in_flight -= 1
        return response, response.get("rows", 0)

    def _error(self, exc: Exception, request: web.Request, method: str) -> web.Response:
        if isinstance(exc, web.HTTPException):  # the router's 404 and 405, the body-size limit's 413
            return error(exc.status, _reason(exc, request), **_allow(exc))
        status = policy.http_status(exc)
        if status == 500:
            log.error("%s %s failed", request.method, request.path, exc_info=exc)
            return error(500, policy.internal_error(method))
        return error(status, str(exc), **_HEADERS.get(status, {}))


# What a refusal tells the client to do: authenticate, or come back in a second.
_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}


def _reason(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no such path: {request.method} {request.path} (see /v2/openapi.json)"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if exc.status == 413:
        return f"request body over this server's limit: {exc.text}"
    return exc.reason


def _allow(exc: web.HTTPException) -> dict[str, str]:
    return {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}


class Routes:
    def __init__(
        self,
        catalogue: Catalogue,
        ready: Callable[[], bool],
        repository: RepositoryExtension,
        console_page: bool,
    ) -> None:
        self.catalogue = catalogue
        self.ready = ready
        self.repository = repository
        self.console_page = console_page

    def name_model(self, request: web.Request) -> None:
        """Set the metrics' model label of a request naming a served model (as resolving it does)."""
        if "model" in request.match_info:
            with contextlib.suppress(VaeError):
                self.catalogue.resolve(*_model(request))

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({"name": NAME, "version": __version__, "extensions": list(EXTENSIONS)})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(document(self.console_page))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        return json_response(self.catalogue.metadata(name, version))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        try:
            endpoint = self.catalogue.resolve(name, version)
        except ModelNotFoundError:
            # A probe's route, open without a token: it names only what was asked, never the
            # models, versions and labels the server holds.
            unit = "digits" if version.isdecimal() else "characters"
            shown = f" version {version!r}" if len(version) <= 20 else f" version of {len(version)} {unit}"
            asked = f"model {name!r}" + (shown if version else "")
            raise ModelNotFoundError(f"{asked} is not served here") from None
        ready = self.ready()
        return json_response({"name": endpoint.name, "ready": ready}, 200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        endpoint = self.catalogue.resolve(*_model(request))
        header, binary = _split(await request.read(), request.headers.get(HEADER_LENGTH))
        body = _json(header)
        inputs = tensors.read_inputs(endpoint, list(_inputs(body, binary)))
        parameters = _object(body.get("parameters", {}), "parameters")
        asked, binary_out = _outputs(body, parameters)
        outputs = await endpoint.infer(inputs, Params.parse(parameters), asked)
        response = _infer_response(endpoint, body.get("id"), outputs, binary_out)
        response["rows"] = len(outputs[0][1]) if outputs else 0
        return response

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise RequestError(f"ready: {ready!r}; expected true or false")
        return json_response(self.repository.index(body.get("repository_name", ""), ready))

    async def repository_load(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        await self.repository.load(
            "", request.match_info["model"], _object(body.get("parameters", {}), "parameters")
        )
        return json_response({})

    async def repository_unload(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        await self.repository.unload(
            "", request.match_info["model"], _object(body.get("parameters", {}), "parameters")
        )
        return json_response({})


async def _optional_json(request: web.Request) -> dict:
    """A JSON object body, or {} without one."""
    raw = await request.read()
    return _json(memoryview(raw)) if raw.strip() else {}


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _split(body: bytes, header_length: str | None) -> tuple[memoryview, memoryview]:
    """The JSON header and the binary tensor data after it."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    if not header_length.isdecimal() or int(header_length) > len(body):
        raise RequestError(
            f"{HEADER_LENGTH}: {header_length!r}; expected the JSON header's length in bytes, "
            f"at most the body's {len(body)}"
        )
    return view[: int(header_length)], view[int(header_length) :]


def _json(header: memoryview) -> dict:
    try:
        body = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON ({exc})") from None
    return _object(body, "request body")


def _object(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _inputs(body: dict, binary: memoryview):
    """(name, datatype, shape, data) of each input: JSON ``data``, or its slice of the binary."""
    given = body.get("inputs")
    if not isinstance(given, list) or not given:
        raise RequestError(
            '"inputs": expected a non-empty list of tensors {"name", "datatype", "shape", "data"}'
        )
    offset = 0
    for index, tensor in enumerate(given):
        tensor = _object(tensor, f"inputs[{index}]")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise RequestError(f'inputs[{index}]: "name" and "datatype" must be strings')
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise TensorError(f"{name}: shape {shape!r}; expected a list of integers")
        size = _object(tensor.get("parameters", {}), f"{name}.parameters").get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise RequestError(
                    f"{name}: binary_data_size {size!r}; {len(binary) - offset} bytes of binary data remain"
                )
            yield name, datatype, shape, binary[offset : offset + size]
            offset += size
        elif "data" in tensor:
            yield name, datatype, shape, tensor["data"]
        else:
            raise RequestError(
                f'{name}: no "data" and no binary_data_size parameter; send the values one way'
            )
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data after the last input's")


def _outputs(body: dict, parameters: dict) -> tuple[list[str], set[str] | bool]:
    """The outputs asked for, and which come back as binary (True: all)."""
    asked = body.get("outputs", [])
    if not isinstance(asked, list):
        raise RequestError('"outputs": expected a list of {"name", "parameters"}')
    names, binary = [], set()
    for index, output in enumerate(asked):
        output = _object(output, f"outputs[{index}]")
        if not isinstance(output.get("name"), str):
            raise RequestError(f'outputs[{index}]: "name" must be a string')
        names.append(output["name"])
        if _object(output.get("parameters", {}), f"{output['name']}.parameters").get("binary_data", False):
            binary.add(output["name"])
    everything = parameters.get("binary_data_output", False) is True
    return names, True if everything else binary


def _infer_response(
    endpoint: Endpoint, request_id: object, outputs: Outputs, binary: set[str] | bool
) -> web.Response:
    described, chunks = [], []
    for output, array in outputs:
        tensor = tensors.describe(output, array)
        if binary is True or output in binary:
            chunk = tensors.raw(array)
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = array.ravel()
        described.append(tensor)
    body = {"model_name": endpoint.name, "model_version": endpoint.version, "outputs": described}
    if isinstance(request_id, str) and request_id:
        body["id"] = request_id
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return web.Response(body=header, content_type=JSON)
    return web.Response(
        body=b"".join([header, *chunks]),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


class MalformedRequests(logging.Filter):
    """aiohttp logs a client's malformed HTTP as an error with its traceback, in every worker;
    it is the client's mistake, answered 400: one warning line saying what came, and the likely
    cause when it is HTTP/2's preface (a gRPC client sent to this port)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            said = (error.message or str(error)).splitlines()[0]
            hint = ""
            if "PRI" in said:
                hint = " (HTTP/2's preface: gRPC goes to the gRPC port, --port, not --http-port)"
            record.msg, record.args = "refused a malformed HTTP request: %s%s", (said, hint)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_MALFORMED = MalformedRequests()


async def start_http(
    app: web.Application, host: str, port: int, ssl_context, *, grace_s: float, idle_s: float
) -> web.AppRunner:
    """Listen on ``host:port`` (shared with other workers: SO_REUSEPORT) on the running loop."""
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED)  # once: a filter is kept by identity
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=grace_s,
        # A request line or header over 8 KiB is refused (400) before the app sees it. aiohttp's
        # keep-alive timer runs from the connection's start (or its last answer) until a whole
        # request head has arrived, so it closes idle connections and slow-header ones alike.
        max_line_size=MAX_HEADER_BYTES,
        max_field_size=MAX_HEADER_BYTES,
        keepalive_timeout=idle_s,
        # A client that closes its connection cancels its handler, and so its queued and running
        # work (the data plane stops at its next step): no CPU for answers no one will read.
        handler_cancellation=True,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"--http-port {port}: cannot listen on {host} ({exc.strerror})") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return runner.addresses[0][1]
