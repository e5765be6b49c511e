"""The Python client of VaeService: numpy in, numpy out.

Arrays larger than one request are split into chunks of ``chunk_rows`` rows,
sent with up to ``max_in_flight`` requests outstanding, and reassembled in order.
UNAVAILABLE is retried (vaeserve.channel), every request carries a deadline of ``timeout``
seconds that its resends share (see ``_answer``), and TLS,
mutual TLS and a bearer token are supported. When a seeded call is split, chunk i uses
seed + i, so the same call with the same chunking is reproducible.

With ``shared_memory=True`` (a server on the same host, started with
``--shared-memory``), Encode passes inputs and outputs through a POSIX
shared-memory object split into one slot per request in flight: the messages
carry references, not bytes (vaeserve.shared_slots).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vaeserve._proto import vae_pb2, vae_pb2_grpc
from vaeserve.channel import ServiceError, channel_target, open_channel
from vaeserve.codec import SharedBytes, from_response, to_tensor
from vaeserve.errors import UNKNOWN_REGION, VaeError
from vaeserve.ood import REFERENCE_IW_SAMPLES, SCORE_FIELDS
from vaeserve.rows import as_images, as_rows
from vaeserve.shared_slots import SharedSlots
from vaeserve.tracecontext import trace_metadata

__all__ = ["ServiceError", "VaeClient", "channel_target"]

# A Score call's work at most, rows × k decoder rows: a tenth of what a default server's scorer
# takes at once (--max-queue-rows 65,536 × 10), so ten such calls run side by side.
SCORE_CALL_DECODER_ROWS = 65_536
# An imported autoencoder's images (or latents) per call: as many as hold about this many pixels
# (4 images of 512 × 512, 12 MiB of float32).
REQUEST_PIXELS = 1 << 20
# Pauses before sending a data call again after UNAVAILABLE: about 10 s in all, what a restarting
# server takes to answer again.
RESEND_BACKOFF_S = (0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0)


# What a call that the server never answered ends with: the connection refused or lost
# (UNAVAILABLE), the stream reset by a server that died or was stopped mid-call (CANCELLED: this
# client cancels only calls whose answers it no longer reads), or reset below gRPC (INTERNAL or
# UNKNOWN naming the HTTP/2 stream). An answer the server gave (an INTERNAL from a handler, say)
# is never sent again.
UNANSWERED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
STREAM_LOST = ("RST_STREAM", "Stream removed", "Socket closed", "Connection reset")


def unanswered(exc: grpc.RpcError) -> bool:
    """True when a call ended without the server answering it (see UNANSWERED)."""
    if exc.code() in UNANSWERED:
        return True
    lost_below = exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    return lost_below and any(sign in (exc.details() or "") for sign in STREAM_LOST)


def _region_unknown(exc: ServiceError) -> bool:
    return exc.code == grpc.StatusCode.NOT_FOUND and UNKNOWN_REGION in exc.details


class VaeClient:
    def __init__(
        self,
        target: str,
        *,
        model: str = "",
        version: str = "",
        timeout: float = 60.0,
        token: str | None = None,
        tls: bool = False,
        root_certificates: str | Path | bytes | None = None,
        client_certificate: str | Path | bytes | None = None,
        client_key: str | Path | bytes | None = None,
        chunk_rows: int = 1024,
        max_in_flight: int = 4,
        max_message_mb: int = 64,
        shared_memory: bool = False,
    ) -> None:
        self.channel = open_channel(
            target, tls, root_certificates, client_certificate, client_key, max_message_mb
        )
        self.stub = vae_pb2_grpc.VaeServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.model, self.version, self.timeout = model, version, timeout
        self.authorization = (("authorization", f"Bearer {token}"),) if token else ()
        self.chunk_rows, self.max_in_flight = chunk_rows, max_in_flight
        self.shared_memory = shared_memory
        self._slots: SharedSlots | None = None
        self._reached: dict[str, Any] | None = None  # the info of the model calls reach, asked once

    def close(self) -> None:
        if self._slots is not None:
            # A server that is gone or restarted holds nothing of ours: nothing to undo there.
            with contextlib.suppress(grpc.RpcError):
                unregister = vae_pb2.UnregisterSharedMemoryRequest(name=self._slots.name)
                self.stub.UnregisterSharedMemory(unregister, timeout=5, metadata=self.metadata)
            self._slots.close()
            self._slots = None
        self.channel.close()

    def warm_up(self) -> None:
        """Connect now (asking for the model's info) and, with shared memory, create and
        register the slots, so that the first call does not pay for them."""
        if self.shared_memory:
            self._shared_slots()
        else:
            self.model_info(self.model)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Every call's metadata: the token, and the caller's trace context (vaeserve.tracecontext)."""
        return self.authorization + trace_metadata()

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the RPCs --------------------------------------------------------------------------------
    def encode(
        self,
        inputs: np.ndarray,
        sample: bool = False,
        seed: int | None = None,
        out: dict[str, np.ndarray] | None = None,
        pipeline_latents: bool = False,
        tile_size: int = 0,
    ) -> dict[str, np.ndarray]:
        """Latent ``mean`` and ``stddev`` [N, M] (and ``z`` with sample) of inputs [N, D]
        (float32 model inputs in [0, 1], or uint8 raw pixels). ``out`` may hold float32
        [N, M] arrays (views too, such as a field of a record array) to fill in place of
        new ones. An imported autoencoder takes images [N, 3, H, W] or [N, H, W, 3] (uint8, or
        float32 in [−1, 1]) and answers [N, C, H/f, W/f], as a pipeline scales them with
        ``pipeline_latents``, in tiles of ``tile_size`` pixels when asked."""
        inputs = self._rows(inputs)  # the core's shape and dtype rules, as vae embed's
        fields = ("mean", "stddev", "z") if sample else ("mean", "stddev")
        options = vae_pb2.AutoencoderOptions(pipeline_latents=pipeline_latents, tile_size=tile_size)
        if self.shared_memory:
            if inputs.ndim == 4:
                raise VaeError(
                    "shared memory carries a VAE's fixed-size rows; call this autoencoder without it"
                )
            return self._encode_shared(inputs, sample, seed, fields, out)
        requests = (
            vae_pb2.EncodeRequest(
                model=self.model,
                version=self.version,
                inputs=to_tensor(part),
                sample=sample,
                seed=_chunk_seed(seed, i),
                autoencoder=options,
            )
            for i, part in enumerate(self._chunks(inputs))
        )
        return self._gather(self.stub.Encode, requests, fields, len(inputs), out=out)

    def encode_stream(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """``mean`` and ``stddev`` [N, M] through EncodeStream: one bidirectional stream of
        chunks, answered in order, for producers that keep one call open."""
        inputs = self._rows(inputs)
        requests = (
            vae_pb2.EncodeRequest(model=self.model, version=self.version, inputs=to_tensor(part))
            for part in self._chunks(inputs)
        )
        try:
            answers = list(self.stub.EncodeStream(requests, timeout=self.timeout, metadata=self.metadata))
        except grpc.RpcError as exc:
            raise ServiceError(exc.code(), exc.details()) from None
        return {
            name: np.concatenate([from_response(getattr(a, name), name) for a in answers])
            for name in ("mean", "stddev")
        }

    def _encode_shared(
        self,
        inputs: np.ndarray,
        sample: bool,
        seed: int | None,
        fields: tuple[str, ...],
        out: dict[str, np.ndarray] | None,
    ) -> dict[str, np.ndarray]:
        slots = self._shared_slots()

        def requests() -> Iterator[vae_pb2.EncodeRequest]:
            for i, part in enumerate(self._chunks(inputs)):
                tensor, outputs = slots.put(i % self.max_in_flight, part)
                yield vae_pb2.EncodeRequest(
                    model=self.model,
                    version=self.version,
                    inputs=tensor,
                    sample=sample,
                    seed=_chunk_seed(seed, i),
                    output_shared_memory=outputs,
                )

        try:
            return self._gather(self.stub.Encode, requests(), fields, len(inputs), slots.read, out)
        except ServiceError as exc:
            if not _region_unknown(exc):
                raise
        # The connection now reaches a server that does not hold the region: one restarted,
        # or another of its --workers. Register it there and send the chunks once more.
        self._call(self.stub.RegisterSharedMemory, slots.registration())
        return self._gather(self.stub.Encode, requests(), fields, len(inputs), slots.read, out)

    def _shared_slots(self) -> SharedSlots:
        if self._slots is None:
            info = self.model_info(self.model)  # sized for the largest version it may reach
            latent = max(m["latent_size"] for m in info)
            input_size = max(m["input_size"] for m in info)
            slot = self.chunk_rows * 4 * (input_size + 3 * latent)
            slots = SharedSlots(self.max_in_flight, slot, self.chunk_rows * 4 * input_size)
            try:
                self._call(self.stub.RegisterSharedMemory, slots.registration())
            except ServiceError:
                slots.close()
                raise
            self._slots = slots
        return self._slots

    def decode(
        self,
        latents: np.ndarray,
        sample: bool = False,
        seed: int | None = None,
        pipeline_latents: bool = False,
        tile_size: int = 0,
    ) -> dict[str, np.ndarray]:
        """Bernoulli ``probs`` [N, D] (and uint8 ``samples``) of latents [N, M]; an imported
        autoencoder's ``images`` [N, 3, f·h, f·w] of latents [N, C, h, w]."""
        latents = np.asarray(latents, np.float32)
        autoencoder = latents.ndim == 4 and self._reaches_autoencoder()
        latents = np.ascontiguousarray(latents) if autoencoder else as_rows(latents, "latents")
        options = vae_pb2.AutoencoderOptions(pipeline_latents=pipeline_latents, tile_size=tile_size)
        requests = (
            vae_pb2.DecodeRequest(
                model=self.model,
                version=self.version,
                latents=to_tensor(part),
                sample=sample,
                seed=_chunk_seed(seed, i),
                autoencoder=options,
            )
            for i, part in enumerate(self._chunks(latents))
        )
        fields = ("images",) if autoencoder else ("probs", "samples") if sample else ("probs",)
        return self._gather(self.stub.Decode, requests, fields, len(latents))

    def reconstruct(
        self,
        inputs: np.ndarray,
        use_mean: bool = False,
        seed: int | None = None,
        pipeline_latents: bool = False,
        tile_size: int = 0,
    ) -> dict[str, np.ndarray]:
        """Posterior predictive ``probs`` and ``samples`` [N, D], and the ``latents`` decoded; an
        imported autoencoder's ``images`` and ``latents``."""
        inputs = self._rows(inputs)
        options = vae_pb2.AutoencoderOptions(pipeline_latents=pipeline_latents, tile_size=tile_size)
        requests = (
            vae_pb2.ReconstructRequest(
                model=self.model,
                version=self.version,
                inputs=to_tensor(part),
                use_mean=use_mean,
                seed=_chunk_seed(seed, i),
                autoencoder=options,
            )
            for i, part in enumerate(self._chunks(inputs))
        )
        fields = ("images", "latents") if inputs.ndim == 4 else ("probs", "samples", "latents")
        return self._gather(self.stub.Reconstruct, requests, fields, len(inputs))

    def sample_prior(
        self, count: int, seed: int | None = None, latent_height: int = 0, latent_width: int = 0
    ) -> dict[str, np.ndarray]:
        """``latents`` z ~ p(z), the model's prior [count, M], their ``probs`` and ``samples`` [count, D];
        an imported autoencoder's N(0, I) latents [count, C, h, w] (a tile's size unless given) and
        their ``images``."""
        # An autoencoder's images are large: one per call. Known only if this client asked already
        # (or sizes were given); else the answers say which outputs came (no call to ask first).
        autoencoder = bool(latent_height or latent_width) or (
            self._reached is not None and self._reached["family"] == "autoencoder"
        )
        per_call = 1 if autoencoder else self.chunk_rows
        counts = [min(per_call, count - start) for start in range(0, count, per_call)] or [count]
        options = vae_pb2.AutoencoderOptions(latent_height=latent_height, latent_width=latent_width)
        requests = (
            vae_pb2.SamplePriorRequest(
                model=self.model,
                version=self.version,
                count=n,
                seed=_chunk_seed(seed, i),
                autoencoder=options,
            )
            for i, n in enumerate(counts)
        )
        fields = None  # those the answers carry: latents, probs, samples; or latents, images
        return self._gather(self.stub.SamplePrior, requests, fields, count)

    def score(
        self,
        inputs: np.ndarray,
        iw_samples: int = REFERENCE_IW_SAMPLES,
        seed: int | None = None,
        row_offset: int = 0,
    ) -> dict[str, np.ndarray]:
        """Per row [N]: ``elbo``, ``log_px`` (k = ``iw_samples`` importance samples; the default is
        the k of the test-set percentiles export records, vaeserve.ood.log_px_meaning says what it is),
        ``complexity_bits`` and ``ood_score``. Seeded scores do not depend on how the rows are
        split into calls: row i's draws are seeded by (seed, row_offset + i)."""
        inputs = self._rows(inputs)
        # The server weighs a Score by rows × k: at a large k, fewer rows per call.
        rows = max(1, min(self.chunk_rows, SCORE_CALL_DECODER_ROWS // (iw_samples or REFERENCE_IW_SAMPLES)))
        starts = range(0, len(inputs), rows)
        requests = (
            vae_pb2.ScoreRequest(
                model=self.model,
                version=self.version,
                inputs=to_tensor(part),
                iw_samples=iw_samples,
                seed=seed,
                row_offset=row_offset + start,
            )
            for start, part in zip(starts, self._chunks(inputs, rows))
        )
        return self._gather(self.stub.Score, requests, SCORE_FIELDS, len(inputs))

    def _rows(self, inputs: np.ndarray) -> np.ndarray:
        """Inputs as rows (vaeserve.rows.as_rows); images of more than one channel need the
        model's image shape to tell [N, H, W, C] from [N, C, H, W], asked once. An imported
        autoencoder's are images [N, 3, H, W] (vaeserve.rows.as_images)."""
        if np.ndim(inputs) <= 2:  # rows: no need to ask (an autoencoder refuses them, saying why)
            return as_rows(inputs, "inputs")
        if self._reaches_autoencoder():
            return as_images(inputs, "inputs")
        return as_rows(inputs, "inputs", tuple(self.model_reached()["image_shape"]))

    def model_reached(self) -> dict[str, Any]:
        """The info of the model (and version) this client's calls reach, asked once."""
        if self._reached is None:
            info = self.model_info(self.model)
            chosen = [m for m in info if str(m["version"]) == self.version] or [
                m for m in info if m["is_default"] or self.model
            ]
            self._reached = max(chosen or info, key=lambda m: m["version"])
        return self._reached

    def _reaches_autoencoder(self) -> bool:
        return self.model_reached()["family"] == "autoencoder"

    def model_info(self, model: str = "") -> list[dict[str, Any]]:
        response = self._call(self.stub.GetModelInfo, vae_pb2.GetModelInfoRequest(model=model))
        return [
            {
                "name": m.name,
                "version": m.version,
                "input_size": m.input_size,
                "latent_size": m.latent_size,
                "image_shape": tuple(m.image_shape),
                "execution_provider": m.execution_provider,
                "variant": m.variant,
                "binarization": m.binarization,
                "metrics": dict(m.metrics),
                "is_default": m.is_default,
                "max_batch_rows": m.max_batch_rows,
                "likelihood": m.likelihood or "bernoulli",
                "family": m.family or "vae",
            }
            for m in response.models
        ]

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... of the whole server ("") or one service."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self.health_stub.Check(
                request, timeout=timeout or self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise ServiceError(exc.code(), exc.details()) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def poll_health(self, timeout: float, service: str = "") -> str:
        """Ask for health until it is SERVING or ``timeout`` seconds pass, each ask bounded by
        what is left: the last status, or the last ServiceError raised. A server still starting
        refuses connections, then reports NOT_SERVING while it warms up; one that answered and
        then refuses connections has exited, and waiting on would only spend the time."""
        deadline = time.monotonic() + timeout
        error: ServiceError | None = None
        answered = False
        while True:
            left = deadline - time.monotonic()
            ask = self.timeout if timeout <= 0 else min(self.timeout, max(left, 0.5))
            try:
                status = self.health(service, ask)
                answered = True
                if status == "SERVING" or left <= 0:
                    return status
            except ServiceError as exc:
                if answered and exc.code == grpc.StatusCode.UNAVAILABLE:
                    raise ServiceError(
                        exc.code, f"the server answered, then stopped answering (it exited?): {exc.details}"
                    ) from None
                answered = answered or exc.code not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
                # A short last ask's DEADLINE_EXCEEDED says less than an earlier refusal.
                if error is None or exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    error = exc
                if time.monotonic() >= deadline:
                    raise error from None
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def wait_until_serving(self, timeout: float, service: str = "") -> bool:
        """True once the server (or ``service``) is SERVING, False after ``timeout`` seconds."""
        with contextlib.suppress(ServiceError):
            return self.poll_health(timeout, service) == "SERVING"
        return False

    # -- plumbing --------------------------------------------------------------------------------
    def _call(self, method: Callable, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise ServiceError(exc.code(), exc.details()) from None

    def _chunks(self, array: np.ndarray, rows: int = 0) -> Iterator[np.ndarray]:
        """Rows already read by ``as_rows``, ``rows`` (else ``chunk_rows``) at a time; images or
        latents of an autoencoder [N, C, H, W] as many as make REQUEST_PIXELS."""
        if array.ndim == 4:
            rows = rows or max(1, min(self.chunk_rows, REQUEST_PIXELS // (array.shape[2] * array.shape[3])))
        rows = rows or self.chunk_rows
        for start in range(0, len(array), rows):
            yield array[start : start + rows]

    def _gather(
        self,
        method: Callable,
        requests: Iterator,
        fields: tuple[str, ...] | None,
        rows: int,
        shared: SharedBytes | None = None,
        out: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Send requests with up to max_in_flight outstanding; put each response's fields in
        place in the ``rows``-row outputs (``out``'s arrays where given), in order. One copy
        per byte, which for outputs in shared memory happens before their slot is reused.
        ``fields`` None: the tensors the first response carries."""
        out = dict(out or {})
        for name, array in out.items():
            if array.shape[0] != rows or array.dtype != np.float32:
                raise ValueError(
                    f"out[{name!r}]: expected float32 [{rows}, ...], got {array.dtype} {array.shape}"
                )
        done = 0
        for response in self._pipelined(method, requests):
            if fields is None:
                fields = tuple(
                    f.name
                    for f, _ in response.ListFields()
                    if f.message_type and f.message_type.name == "Tensor"
                )
            for name in fields:
                part = from_response(getattr(response, name), name, shared)
                if name not in out:
                    out[name] = np.empty((rows, *part.shape[1:]), part.dtype)
                if done + len(part) > rows:
                    raise VaeError(f"{name}: the server returned more than the {rows} rows sent")
                out[name][done : done + len(part)] = part
            done += len(part)
        if done != rows:
            raise VaeError(f"the server returned {done} rows of the {rows} sent")
        return out

    def _pipelined(self, method: Callable, requests: Iterator) -> Iterator[Any]:
        in_flight: deque[tuple[Any, grpc.Future, float]] = deque()
        try:
            for request in requests:
                in_flight.append((request, self._send(method, request), time.monotonic() + self.timeout))
                if len(in_flight) >= self.max_in_flight:
                    yield self._answer(method, *in_flight.popleft())
            while in_flight:
                yield self._answer(method, *in_flight.popleft())
        except grpc.RpcError as exc:
            for _, future, _ in in_flight:
                future.cancel()
            raise ServiceError(exc.code(), exc.details()) from None

    def _send(self, method: Callable, request: Any, timeout: float | None = None) -> grpc.Future:
        return method.future(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def _answer(self, method: Callable, request: Any, future: grpc.Future, deadline: float) -> Any:
        """The response, the request sent again (round robin takes it to another replica) while
        the server never answered it (``unanswered``) and ``deadline`` leaves time: gRPC's own
        retries stop once a call has reached a server, so a server (or worker) that dies, or is
        stopped, with the call in flight would fail it. Encode, Decode, Reconstruct, SamplePrior
        and Score hold no state, so sending one again is safe, and a seeded one gives the same
        answer. The resends share the request's ``timeout``: a server that cannot be reached
        fails the call when it is spent, not after every resend has had a whole one, and with
        the error that made it resend (a refused connection, a failed handshake), which says
        more than the deadline that stopped it."""
        unreached: grpc.RpcError | None = None
        for pause in RESEND_BACKOFF_S:
            try:
                return _result(future, unreached)
            except grpc.RpcError as exc:
                left = deadline - time.monotonic() - pause
                if not unanswered(exc) or left <= 0:
                    raise
                unreached = exc
                time.sleep(pause)
                future = self._send(method, request, left)
        return _result(future, unreached)


def _result(future: grpc.Future, unreached: grpc.RpcError | None) -> Any:
    """The call's response; if it is a resend (``unreached``: the error that made the client send it
    again) that the deadline stopped, that error, which says why the server never answered."""
    try:
        return future.result()
    except grpc.RpcError as exc:
        if unreached is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise unreached from None
        raise


def _chunk_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed + index) % 2**64
