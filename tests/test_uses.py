"""What every data-plane use goes through (service.uses), on a real server over the tiny model
called over vae.v1 and OIP REST, read from its metrics page: the in-flight gauge autoscalers
read, and the response cache (`--cache-mb`), whose key and bound are also checked in-process."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from servers import metric

from vaeserve.client import VaeClient
from vaeserve.datasets import model_inputs
from vaeserve.service.cache import ResponseCache, version_key
from vaeserve.service.uses import seeded, use


@pytest.fixture(scope="module")
def server(serve):
    return serve("--cache-mb", "64", "--workers", "1")  # one process: one cache (each worker has its own)


@pytest.fixture(scope="module")
def x(mnist) -> np.ndarray:
    return model_inputs(mnist.test_images[:64], "threshold")


def rest_encode(server, rows: np.ndarray) -> bytes:
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}
        ]
    }
    request = urllib.request.Request(
        f"http://{server.http}/v2/models/tiny-encoder/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.read()


def test_a_repeated_encode_is_a_cache_hit_with_the_same_bytes(server, x: np.ndarray) -> None:
    hits = metric(server, "vaeserve_cache_hits_total", model="tiny", method="encode")
    misses = metric(server, "vaeserve_cache_misses_total", model="tiny", method="encode")
    with VaeClient(server.target, timeout=30) as client:
        first = client.encode(x[:20])
        again = client.encode(x[:20])
        other = client.encode(x[20:40])
    assert metric(server, "vaeserve_cache_hits_total", model="tiny", method="encode") == hits + 1
    assert metric(server, "vaeserve_cache_misses_total", model="tiny", method="encode") == misses + 2
    for name in ("mean", "stddev"):
        assert first[name].tobytes() == again[name].tobytes()
        assert not np.array_equal(first[name], other[name])
    # OIP REST reaches the same data plane: its second identical call is a hit with the same answer.
    assert rest_encode(server, x[40:45]) == rest_encode(server, x[40:45])
    assert metric(server, "vaeserve_cache_hits_total", model="tiny", method="encode") == hits + 2
    assert metric(server, "vaeserve_cache_bytes") > 0


def test_only_deterministic_calls_are_cached(server) -> None:
    """A seeded SamplePrior repeats from the cache; an unseeded one is neither hit nor missed
    (its answer is a fresh draw every time)."""
    before = {
        kind: metric(server, f"vaeserve_cache_{kind}_total", model="tiny", method="sample_prior")
        for kind in ("hits", "misses")
    }
    with VaeClient(server.target, timeout=30) as client:
        seeded_draws = [client.sample_prior(4, seed=11)["samples"] for _ in range(2)]
        fresh_draws = [client.sample_prior(4)["latents"] for _ in range(2)]
    assert np.array_equal(*seeded_draws)
    assert not np.array_equal(*fresh_draws)
    after = {
        kind: metric(server, f"vaeserve_cache_{kind}_total", model="tiny", method="sample_prior")
        for kind in ("hits", "misses")
    }
    assert after == {"hits": before["hits"] + 1, "misses": before["misses"] + 1}


def test_the_cache_stays_within_its_bound(serve, x: np.ndarray) -> None:
    """1 MiB holds one 256-row Decode answer (probs, 256 × 784 float32: 0.8 MB), not two: each
    new one evicts the one before, and the bytes held never pass the bound."""
    server = serve("--cache-mb", "1", "--workers", "1")
    rng = np.random.default_rng(0)
    with VaeClient(server.target, timeout=30) as client:
        for _ in range(3):
            client.decode(rng.standard_normal((256, 8)).astype(np.float32))
    assert metric(server, "vaeserve_cache_evictions_total") == 2
    assert 0 < metric(server, "vaeserve_cache_bytes") <= 1 << 20


def test_vae_bench_distinct_requests_miss_once_each_then_hit(server) -> None:
    """`vae bench --distinct 40`: each caller cycles through 40 requests that differ in a few pixels,
    so each misses once and every later round hits; the default repeats the first of them."""
    from test_cli import vae

    before = {k: metric(server, f"vaeserve_cache_{k}_total", method="encode") for k in ("hits", "misses")}
    common = ("bench", "--target", server.target, "--model", "tiny", "--batch", "3", "--concurrency", "1")
    report = vae(*common, "--seconds", "0.6", "--distinct", "40", "--json")
    assert report.returncode == 0, report.stderr
    cell = json.loads(report.stdout)["cells"][0]
    assert cell["calls_per_s"] * 0.6 > 80 and cell["errors"] == {}  # two rounds at least
    after = {k: metric(server, f"vaeserve_cache_{k}_total", method="encode") for k in ("hits", "misses")}
    assert after["misses"] == before["misses"] + 40 and after["hits"] >= before["hits"] + 40
    same = vae(*common, "--seconds", "0.3", "--json")  # the first of the 40: held, every call a hit
    assert same.returncode == 0, same.stderr
    assert metric(server, "vaeserve_cache_misses_total", method="encode") == after["misses"]
    assert metric(server, "vaeserve_cache_hits_total", method="encode") > after["hits"] + 10


def test_vae_bench_distinct_counts_it_cannot_make_are_refused(server) -> None:
    from test_cli import assert_one_line_error, vae

    common = ("bench", "--target", server.target, "--batch", "1", "--concurrency", "1")
    assert_one_line_error(vae(*common, "--distinct", "0"), 1, "--distinct 0: expected 1 to 1,000,000")
    assert_one_line_error(vae(*common, "--distinct", "1000001"), 1, "--distinct 1000001")
    assert_one_line_error(vae(*common, "--distinct", "2", "--shared-memory"), 1, "without --shared-memory")


def test_bench_variants_are_distinct_valid_inputs() -> None:
    from vaeserve._proto import vae_pb2
    from vaeserve.bench import variants
    from vaeserve.codec import to_tensor

    for rows in (np.arange(6, dtype=np.uint8).reshape(2, 3), np.array([[0.0, 1.0, 0.25]], np.float32)):
        made = variants(vae_pb2.EncodeRequest(model="m", inputs=to_tensor(rows)), 2**rows.size)
        assert len({m.inputs.data for m in made}) == 2**rows.size and made[0].inputs.data == rows.tobytes()
        values = np.stack([np.frombuffer(m.inputs.data, rows.dtype) for m in made])
        assert values.min() >= 0 and values.max() <= (255 if rows.dtype == np.uint8 else 1)
        assert all(m.model == "m" and list(m.inputs.shape) == list(rows.shape) for m in made)


class Toy:
    """A served version as the cache sees it: a key and a use that counts its runs."""

    def __init__(self, cache: ResponseCache, sha: str) -> None:
        graphs = {"encoder": SimpleNamespace(sha256=sha), "decoder": SimpleNamespace(sha256=sha)}
        self.version = SimpleNamespace(name="m", version=1, manifest=SimpleNamespace(graphs=graphs))
        self.cache = cache
        self.cache_key = version_key(self.version)
        self.in_flight = None
        self.runs = 0

    @use(seeded)
    async def sample_prior(self, count: int, seed: int | None) -> dict[str, np.ndarray]:
        self.runs += 1
        return {"latents": np.random.default_rng(seed).standard_normal((count, 4), dtype=np.float32)}


def test_another_version_never_answers_from_these_entries() -> None:
    """Two versions of one name and number whose graphs differ (one overwritten in place) share
    the cache, not its entries; answers are read-only; the least recently used goes first."""
    cache = ResponseCache(1 << 20)
    old, new = Toy(cache, "a" * 64), Toy(cache, "b" * 64)
    first = asyncio.run(old.sample_prior(3, 5))
    assert asyncio.run(old.sample_prior(3, 5))["latents"] is first["latents"] and old.runs == 1
    asyncio.run(new.sample_prior(3, 5))
    assert new.runs == 1 and cache.hits == 1 and cache.misses == 2
    with pytest.raises(ValueError, match="read-only"):
        first["latents"][0, 0] = 1.0
    asyncio.run(old.sample_prior(3, None))  # unseeded: not a function of its arguments
    assert old.runs == 2 and len(cache.entries) == 2
    small = ResponseCache(2 * (3 * 4 * 4) + 2 * 32)  # room for two answers and their keys
    toy = Toy(small, "c" * 64)
    for seed in (1, 2, 1, 3):  # 1 is used again before 3 comes: 2 is the least recently used
        asyncio.run(toy.sample_prior(3, seed))
    assert small.evictions == 1 and toy.runs == 3
    asyncio.run(toy.sample_prior(3, 1))
    assert toy.runs == 3  # still held


def test_calls_in_flight_are_a_gauge_per_model(server, x: np.ndarray) -> None:
    """Score calls of 64 rows × k = 1000 (seconds each) from four threads: the gauge shows them
    while they run and falls back to 0 when they have all answered."""
    import servers

    assert metric(server, "vaeserve_in_flight_calls", model="tiny") == 0
    seen: list[float] = []

    def call(seed: int) -> None:
        with VaeClient(server.target, timeout=120) as client:
            client.score(x, iw_samples=1000, seed=seed)

    callers = [threading.Thread(target=call, args=(seed,)) for seed in range(100, 104)]
    for caller in callers:
        caller.start()

    def busy() -> bool:
        seen.append(metric(server, "vaeserve_in_flight_calls", model="tiny"))
        return seen[-1] >= 2

    try:
        servers.until(busy, timeout=60, what="two calls in flight")
    finally:
        for caller in callers:
            caller.join()
    assert max(seen) <= 4
    assert metric(server, "vaeserve_in_flight_calls", model="tiny") == 0
