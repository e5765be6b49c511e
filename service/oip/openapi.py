"""The OpenAPI 3.0 document of the REST API, served at ``/v2/openapi.json``.

It follows KServe's REST specification of the Open Inference Protocol: the paths, the JSON
bodies and the error body, with the binary tensor data extension described on infer.
"""

from __future__ import annotations

import functools

from vaeserve import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_TENSOR_DATA = {
    "description": "The elements, row-major: flat or nested lists of numbers.",
    "type": "array",
    "items": {"oneOf": [{"type": "number"}, {"type": "array", "items": {}}]},
}
_PARAMETERS = {
    "type": "object",
    "additionalProperties": {"oneOf": [{"type": "boolean"}, {"type": "integer"}, {"type": "string"}]},
}


def _tensor(with_data: bool) -> dict:
    properties = {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": ["FP32", "UINT8", "INT64", "FP16"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_size": {"type": "integer", "minimum": 0},
                "binary_data": {"type": "boolean"},
            },
        },
    }
    if with_data:
        properties["data"] = _TENSOR_DATA
    return {"type": "object", "required": ["name", "datatype", "shape"], "properties": properties}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _repository_paths(model: dict) -> dict:
    """The model repository extension: the repository's model names (NAME), the admin token."""
    index = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "version", "state", "reason"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string", "enum": ["READY", "UNAVAILABLE", "UNLOADED"]},
                "reason": {"type": "string"},
            },
        },
    }
    body = {
        "required": False,
        "content": {
            "application/json": {"schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}
        },
    }

    def post(summary: str, operation: str, schema: dict, parameters: list[dict]) -> dict:
        responses = {"200": _json(schema, summary), **_errors(400, 401, 403, 404, 429)}
        operation_ = {
            "summary": summary,
            "operationId": operation,
            "responses": responses,
            "security": [{"admin": []}],
        }
        return {
            "post": {**operation_, "requestBody": body, **({"parameters": parameters} if parameters else {})}
        }

    model_name = {**model, "description": "a model of the repository (NAME, not NAME-encoder)"}
    return {
        "/v2/repository/index": post("What the repository holds", "RepositoryIndex", index, []),
        "/v2/repository/models/{model}/load": post(
            "Load a model's versions", "RepositoryModelLoad", {"type": "object"}, [model_name]
        ),
        "/v2/repository/models/{model}/unload": post(
            "Unload a model", "RepositoryModelUnload", {"type": "object"}, [model_name]
        ),
    }


def _errors(*codes: int) -> dict:
    meaning = {
        400: "Bad request: the message says what was wrong and what was expected",
        401: "Missing or invalid bearer token",
        403: "The model repository extension is off (the server has no --admin-token-file)",
        404: "Unknown model or version",
        413: "Request body over the server's limit (--max-message-mb)",
        429: "Too many requests in progress (--max-concurrent-rpcs) or rows queued for the model "
        "(--max-queue-rows); retry after Retry-After seconds, with backoff",
        503: "Not ready; retry",
    }
    return {str(code): _json(_ERROR, meaning[code]) for code in codes}


def _model_paths(prefix: str, parameters: list[dict], suffix: str) -> dict:
    """The paths of one model (``suffix`` "") or of one version of it ("Version"); operation ids
    are the server's route names."""
    infer_body = {
        "required": True,
        "description": "JSON; or (binary tensor data extension) the JSON request, "
        "Inference-Header-Content-Length bytes long, then the raw bytes of each input whose "
        "binary_data_size parameter is set, in order.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    header = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "Length of the JSON part of a binary request.",
    }
    return {
        prefix: {
            "get": {
                "summary": "Model metadata",
                "operationId": f"ModelMetadata{suffix}",
                "parameters": parameters,
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/ModelMetadata"}, "The model"),
                    **_errors(401, 404, 429),
                },
            }
        },
        f"{prefix}/ready": {
            "get": {
                "summary": "Model ready",
                "operationId": f"ModelReady{suffix}",
                "parameters": parameters,
                "responses": {"200": _json({"type": "object"}, "Ready"), **_errors(404, 503)},
            }
        },
        f"{prefix}/infer": {
            "post": {
                "summary": "Inference",
                "operationId": f"ModelInfer{suffix}",
                "parameters": [*parameters, header],
                "requestBody": infer_body,
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/InferenceResponse"}, "The outputs"),
                    **_errors(400, 401, 404, 413, 429),
                },
            }
        },
    }


def _console_paths(page: bool) -> dict:
    """The console's read-only JSON (any client may call it) and, unless --no-console, its page."""
    manifest = {
        "type": "object",
        "nullable": True,
        "description": "The version's manifest in brief: dataset, preset, likelihood, shapes, test "
        "scores, export parity, created, checksum prefixes, the test set's Score percentiles "
        "(score_reference) and each latent dimension's activity",
        "properties": {
            "dataset": {"type": "string"},
            "preset": {"type": "string"},
            "likelihood": {"type": "string"},
            "image_shape": {"type": "array", "items": {"type": "integer"}},
            "latent_size": {"type": "integer"},
            "test": {"type": "object"},
            "unit_activity": {"type": "array", "items": {"type": "number"}},
            "score_reference": {"type": "object"},
        },
    }
    version = {
        "type": "object",
        "required": ["version", "state", "reason", "manifest"],
        "properties": {
            "version": {"type": "integer"},
            "state": {"type": "string", "enum": ["READY", "UNAVAILABLE", "UNLOADED"]},
            "reason": {"type": "string"},
            "manifest": manifest,
        },
    }
    model = {
        "type": "object",
        "required": ["name", "default", "latest", "labels", "versions"],
        "properties": {
            "name": {"type": "string"},
            "default": {"type": "boolean"},
            "latest": {"type": "integer", "nullable": True, "description": "null: none loaded"},
            "labels": {"type": "object", "additionalProperties": {"type": "integer"}},
            "versions": {"type": "array", "items": version},
        },
    }
    series = {
        "type": "object",
        "required": ["model", "protocol", "calls", "errors", "latency"],
        "properties": {
            "model": {"type": "string", "description": "empty: calls that named no loaded model"},
            "protocol": {"type": "string", "enum": ["v1", "oip-grpc", "oip-http"]},
            "calls": {"type": "number"},
            "errors": {"type": "number"},
            "latency": {
                "type": "object",
                "description": "calls that took at most each bound (seconds; +Inf: all)",
                "additionalProperties": {"type": "number"},
            },
        },
    }
    live = {
        "type": "object",
        "required": ["time", "series"],
        "properties": {"time": {"type": "number"}, "series": {"type": "array", "items": series}},
    }
    models = {"type": "array", "items": model}
    paths = {
        "/v2/console/models": _get(
            "Every model of the repository, its versions, labels and manifests in brief",
            "ConsoleModels",
            {"type": "object", "required": ["models"], "properties": {"models": models}},
            401,
            429,
        ),
        "/v2/console/live": _get(
            "Calls, errors and latency so far, per model and protocol, of the whole service",
            "ConsoleLive",
            live,
            401,
            429,
        ),
    }
    if page:
        paths.update(_page_paths())
    return paths


def _get(summary: str, operation: str, schema: dict, *codes: int) -> dict:
    responses = {"200": _json(schema, summary), **_errors(*codes)}
    return {"get": {"summary": summary, "operationId": operation, "responses": responses}}


def _page_paths() -> dict:
    def page(summary: str, operation: str, types: list[str], parameters: list[dict]) -> dict:
        content = {kind: {"schema": {"type": "string"}} for kind in types}
        responses = {"200": {"description": summary, "content": content}}
        if parameters:
            responses.update(_errors(404))
        get = {"summary": summary, "operationId": operation, "responses": responses, "security": [{}]}
        return {"get": {**get, **({"parameters": parameters} if parameters else {})}}

    file = {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}
    types = ["text/javascript", "text/css", "text/plain"]
    return {
        "/": page("The web console (docs/console.md)", "Console", ["text/html"], []),
        "/console/{file}": page("A file of the console's page", "ConsoleAsset", types, [file]),
    }


@functools.cache
def document(console_page: bool = True) -> dict:
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    metadata = {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _tensor(False)},
            "outputs": {"type": "array", "items": _tensor(False)},
        },
    }
    request = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "inputs": {"type": "array", "minItems": 1, "items": _tensor(True)},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
                },
            },
        },
    }
    response = {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _tensor(True)},
        },
    }
    server_metadata = {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    }

    def open_(summary: str, operation: str, schema: dict, *codes: int) -> dict:
        """What orchestrators and tools read without a token."""
        get = _get(summary, operation, schema, *codes)["get"]
        return {"get": {**get, "security": [{}]}}

    return {
        "openapi": "3.0.3",
        "info": {
            "title": "vaeserve: Open Inference Protocol (KServe V2) REST API",
            "version": __version__,
            "description": "Every loaded model NAME appears as NAME-encoder, NAME-decoder, "
            "NAME-reconstruct, NAME-sample-prior and NAME-score. Request parameters: seed (int), "
            "sample (bool), use_mean (bool), iw_samples and row_offset (int, NAME-score); for an "
            "imported autoencoder pipeline_latents (bool), tile_size (pixels), height and width "
            "(int, NAME-sample-prior's latents).",
        },
        "paths": {
            "/v2/health/live": open_("Server live", "ServerLive", {"type": "object"}),
            "/v2/health/ready": open_("Server ready", "ServerReady", {"type": "object"}, 503),
            "/v2": _get("Server metadata", "ServerMetadata", server_metadata, 401, 429),
            "/v2/openapi.json": open_("This document", "OpenAPI", {"type": "object"}),
            **_model_paths("/v2/models/{model}", [model], ""),
            **_model_paths("/v2/models/{model}/versions/{version}", [model, version], "Version"),
            **_repository_paths(model),
            **_console_paths(console_page),
        },
        # Both tokens are optional: a server started without --token-file asks for none.
        "security": [{}, {"client": []}],
        "components": {
            "securitySchemes": {
                "client": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the token of --token-file, when the server has one",
                },
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the token of --admin-token-file (the repository extension)",
                },
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "ModelMetadata": metadata,
                "InferenceRequest": request,
                "InferenceResponse": response,
            },
        },
    }
