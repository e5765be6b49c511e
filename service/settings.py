"""`vae serve` settings: one typed dataclass, every field a flag and a VAESERVE_* variable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from vaeserve.errors import ConfigError
from vaeserve.flags import option
from vaeserve.runtime import DEVICES, usable_cores

ENV_PREFIX = "VAESERVE_"
VARIANTS = ("fp32", "int8", "fp16")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
# --workers 0 starts one worker per usable core up to this many: each loads every model, and past
# a few workers the loop threads are no longer what limits calls/s.
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class ServeSettings:
    repo: str = option(
        "models",
        "model repository: a folder, or s3://BUCKET/PREFIX, gs://... on object storage (served from "
        "a verified local copy under $VAESERVE_CACHE_DIR; credentials from the environment)",
    )
    model: str | None = option(
        None,
        "serve only this model, the default for requests naming none (unset: every model in the repository)",
    )
    default_model: str | None = option(
        None,
        "the model requests naming none are sent to, among several served (unset: the only model "
        "when there is one; with several, such requests are refused naming them)",
    )
    version: str = option("all", "versions to load: all, latest or a number")
    variant: str = option("fp32", "graph variant: fp32, int8 (CPU) or fp16 (CUDA)", VARIANTS)
    poll_s: float = option(
        0.0,
        "rescan the repository every this many seconds: load new versions, retire removed ones, "
        "follow labels.json (0: load once at start)",
    )
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(50051, "gRPC port (vae.v1 and the Open Inference Protocol)")
    http_port: int = option(8000, "Open Inference Protocol HTTP/REST port (0: off)")
    console: bool = option(
        True,
        "the web console at / on --http-port: models, samples, scores of your input, latent space, "
        "versions side by side, live counters (docs/console.md)",
    )
    device: str = option("auto", "auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU", DEVICES)
    event_loop: str = option(
        "auto", "auto: uvloop when installed (less CPU per call), else asyncio's own", EVENT_LOOPS
    )
    workers: int = option(
        0,
        "server processes sharing the port (SO_REUSEPORT), each loading every model; more than 1 "
        f"lifts the one-event-loop limit on calls/s (0: one per usable core, at most {MAX_AUTO_WORKERS}; "
        "1 with --port 0)",
    )
    threads: int = option(
        0,
        "CPU: batches above --inline-max-rows run as this many one-thread onnxruntime calls "
        "in parallel; CUDA: ignored (0: one per core)",
    )
    batching: bool = option(
        False,
        "merge concurrent requests into one onnxruntime run (off: on CPU it costs more calls/s "
        "than it saves; docs/benchmarks.md)",
    )
    batch_max_rows: int = option(1024, "largest merged batch, in rows")
    batch_max_delay_ms: float = option(
        0.5,
        "while calls arrive closer together than this, a batch waits this long for more "
        "(a lone client never waits)",
    )
    inline_max_rows: int = option(
        16, "batches up to this many rows run on the event loop with a one-thread session (0: never)"
    )
    shared_memory: bool = option(
        False,
        "let clients on this host register shared-memory regions and pass tensors by reference "
        "(containers: share the IPC namespace)",
    )
    shared_memory_prefix: str = option(
        "vaeserve-",
        "with --shared-memory, the only shared-memory objects (/dev/shm/NAME) a client may register: "
        "names starting with this ('' allows any object the server's user can open)",
    )
    max_request_rows: int = option(4096, "most rows (or SamplePrior count) one request may carry")
    max_request_pixels: int = option(
        16_777_216,
        "imported autoencoders: most pixels (images × height × width, or what a Decode or SamplePrior "
        "would give) one request may carry; 4096 × 4096 by default",
    )
    tile_size: int = option(
        0,
        "imported autoencoders: tile side in pixels for tiled encoding and decoding (0: the model's, "
        "as diffusers' enable_tiling() has it); a request's tile_size parameter overrides it",
    )
    max_loaded_models: int = option(
        0,
        "bounded residency: keep at most this many models loaded, evicting the least recently called "
        "and loading another when a call names it (the call waits, within its deadline); 0: no bound",
    )
    max_loaded_mb: int = option(
        0,
        "bounded residency: keep at most this many MiB of ONNX graphs loaded (the models' graph files), "
        "as --max-loaded-models does; 0: no bound",
    )
    cache_mb: int = option(
        0,
        "response cache: answer repeated deterministic calls (Encode and Decode without draws, seeded "
        "Reconstruct, SamplePrior and Score) from up to this many MiB of memory per process; 0: off",
    )
    max_iw_samples: int = option(
        1000, "most importance samples k per row a Score call may ask for (rows × k decoder rows)"
    )
    max_queue_rows: int = option(
        65536,
        "rows waiting or running per graph before new calls get RESOURCE_EXHAUSTED (a call whose "
        "deadline the rows ahead would pass is refused up front too); Score: ten times as many "
        "decoder rows, rows × k",
    )
    max_message_mb: int = option(64, "largest gRPC message received or sent, in MiB")
    heap_keep_mb: int = option(
        128,
        "glibc: MiB of freed heap kept for the next calls' message buffers instead of fresh "
        "pages each call (0: glibc's defaults)",
    )
    max_concurrent_rpcs: int = option(
        512, "calls in progress on each port before new ones are refused (gRPC RESOURCE_EXHAUSTED, HTTP 429)"
    )
    http_idle_s: float = option(
        75.0,
        "REST: close a connection that has not sent a whole request's headers this many seconds "
        "after connecting or after its last answer (idle keep-alive and slow-header clients)",
    )
    allowed_hosts: str = option(
        "",
        "REST: host names a request's Host header may carry (comma-separated; IP addresses are "
        "always accepted; '*': any). Default: localhost only when --host is a loopback address, "
        "else any (DNS rebinding: docs/reliability.md)",
    )
    metrics_port: int = option(9464, "Prometheus metrics HTTP port (0: off)")
    grace_s: float = option(10.0, "on SIGTERM, seconds to finish calls in flight")
    token_file: Path | None = option(None, "file holding the bearer token clients must send")
    admin_token_file: Path | None = option(
        None,
        "file holding the bearer token of operators: it alone opens the model repository extension "
        "(index, load, unload), which is off without it",
    )
    tls_cert: Path | None = option(None, "PEM server certificate (enables TLS)")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = option(
        None, "PEM CA bundle; clients must present a certificate it signed (mTLS)"
    )

    @property
    def folder(self) -> Path:
        """The local folder served: the repository, or a store's verified local copy."""
        return Path(self.repo)

    def validate(self) -> ServeSettings:
        if self.version not in ("all", "latest") and not self.version.isdecimal():
            raise ConfigError(f"--version {self.version!r}: expected all, latest or a version number")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in (
            "batch_max_rows",
            "max_request_rows",
            "max_request_pixels",
            "max_iw_samples",
            "max_queue_rows",
            "max_message_mb",
            "max_concurrent_rpcs",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.http_idle_s <= 0:
            raise ConfigError(f"--http-idle-s {self.http_idle_s}: expected seconds > 0")
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers}: expected 0 (one per core) or a count of processes")
        if self.workers > 1 and self.port == 0:
            raise ConfigError(f"--workers {self.workers}: needs a fixed --port (0 gives each worker its own)")
        if (
            min(
                self.batch_max_delay_ms,
                self.grace_s,
                self.threads,
                self.heap_keep_mb,
                self.http_port,
                self.poll_s,
                self.tile_size,
                self.cache_mb,
                self.max_loaded_models,
                self.max_loaded_mb,
            )
            < 0
        ):
            raise ConfigError(
                "--batch-max-delay-ms, --grace-s, --threads, --heap-keep-mb, --http-port, --poll-s, "
                "--tile-size, --cache-mb, --max-loaded-models and --max-loaded-mb must not be negative"
            )
        return self

    def with_workers(self) -> ServeSettings:
        """--workers 0 made concrete: one per usable core (at most MAX_AUTO_WORKERS), or one when
        the port is 0 (each worker would get a port of its own)."""
        if self.workers:
            return self
        workers = 1 if self.port == 0 else min(usable_cores(), MAX_AUTO_WORKERS)
        return dataclasses.replace(self, workers=workers)

    def read_token(self) -> str | None:
        return _read_token(self.token_file, "--token-file")

    def read_admin_token(self) -> str | None:
        token = _read_token(self.admin_token_file, "--admin-token-file")
        if token is not None and token == self.read_token():
            raise ConfigError(
                "--admin-token-file holds the clients' token; give operators a token of their own"
            )
        return token


def _read_token(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc.strerror})") from None
    if not token:
        raise ConfigError(f"{flag} {path} is empty")
    return token
