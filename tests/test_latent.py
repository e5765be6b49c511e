"""Latent-diffusion autoencoders (issue 39): `vae import --diffusers` of an AutoencoderKL (four
blocks, scaling and shift factors) and an AutoencoderTiny saved by save_pretrained with seeded
random weights, checked against diffusers itself on the same weights: the graphs at sizes the
export never saw, and tiled encoding and decoding against diffusers' enable_tiling()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from autoencoders import KL_CONFIG, save_kl, save_tiny

from vaeserve.repository import resolve
from vaeserve.runtime import open_session

CPU = ["CPUExecutionProvider"]


def vae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vaeserve.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="session")
def autoencoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    return {"kl": save_kl(root / "kl"), "tiny": save_tiny(root / "tiny")}


@pytest.fixture(scope="session")
def latent_repo(tmp_path_factory: pytest.TempPathFactory, autoencoders: dict[str, Path]) -> Path:
    """Both imported by the real command, the KL one with its fp16 variant."""
    repo = tmp_path_factory.mktemp("latent_models")
    for name, extra in (("kl", ["--variants", "fp16"]), ("tiny", [])):
        result = vae(
            "import", "--diffusers", str(autoencoders[name]), "--repo", str(repo), "--name", name, *extra
        )
        assert result.returncode == 0, result.stderr
        assert f"imported {repo / name / '1'}" in result.stdout
    return repo


def diffusers_model(folder: Path):
    import diffusers

    kind = json.loads((folder / "config.json").read_text())["_class_name"]
    return getattr(diffusers, kind).from_pretrained(folder, low_cpu_mem_usage=False).eval()


def test_manifest_records_the_autoencoder(latent_repo: Path, autoencoders: dict[str, Path]) -> None:
    kl = resolve(latent_repo, "kl").manifest
    record = kl.autoencoder
    assert record.diffusers_class == "AutoencoderKL" and record.stochastic
    assert (record.scaling_factor, record.shift_factor) == (
        KL_CONFIG["scaling_factor"],
        KL_CONFIG["shift_factor"],
    )
    assert (record.latent_channels, record.downscale, record.pixel_range) == (4, 8, (-1.0, 1.0))
    assert record.tiling.to_dict() == {
        "style": "kl", "sample_tile": 64, "latent_tile": 8, "overlap": 0.25, "downscale": 8
    }  # fmt: skip
    assert record.config["block_out_channels"] == list(KL_CONFIG["block_out_channels"])
    assert max(kl.parity["max_abs_diff"].values()) < 1e-4
    fp16 = kl.variants["fp16"]["max_abs_diff_vs_diffusers_fp32"]
    assert 0 < max(fp16.values()) < 0.1  # recorded: float16 rounds, and is not broken
    tiny = resolve(latent_repo, "tiny").manifest.autoencoder
    assert tiny.diffusers_class == "AutoencoderTiny" and not tiny.stochastic
    assert tiny.tiling.style == "tiny" and tiny.shift_factor == 0.0
    signature = resolve(latent_repo, "kl").manifest.graphs["encoder"].signature
    assert signature["inputs"][0]["shape"][1] == 3 and all(
        isinstance(d, str) for i in (0, 2, 3) for d in [signature["inputs"][0]["shape"][i]]
    )  # batch, height and width dynamic


@pytest.mark.parametrize("name", ["kl", "tiny"])
def test_graphs_equal_diffusers_at_new_sizes(
    latent_repo: Path, autoencoders: dict[str, Path], name: str
) -> None:
    import torch

    model = diffusers_model(autoencoders[name])
    version = resolve(latent_repo, name)
    encoder = open_session(version.graph_path("encoder"), CPU)
    decoder = open_session(version.graph_path("decoder"), CPU)
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (3, 3, 48, 80)).astype(np.float32)
    latents = rng.standard_normal((1, 4, 5, 9)).astype(np.float32)
    mean, stddev = encoder.run(["mean", "stddev"], {"images": images})
    (decoded,) = decoder.run(None, {"latents": latents})
    with torch.no_grad():
        if name == "kl":
            dist = model.encode(torch.from_numpy(images)).latent_dist
            expected_mean, expected_stddev = dist.mean.numpy(), dist.std.numpy()
        else:
            expected_mean = model.encode(torch.from_numpy(images)).latents.numpy()
            expected_stddev = np.zeros_like(expected_mean)
        expected_images = model.decode(torch.from_numpy(latents)).sample.numpy()
    assert mean.shape == (3, 4, 6, 10) and decoded.shape == (1, 3, 40, 72)
    np.testing.assert_allclose(mean, expected_mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(stddev, expected_stddev, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decoded, expected_images, atol=1e-4, rtol=0)
    assert np.abs(decoded).max() > 0.01 and np.abs(mean).std() > 0.01  # not a degenerate model


def test_tiled_kl_equals_diffusers_enable_tiling(latent_repo: Path, autoencoders: dict[str, Path]) -> None:
    """Latents 20×28 against tiles of 8 latents (SD's 2048-pixel decode against 64-latent tiles,
    scaled down): 3×4 tiles overlapping, blended, cropped."""
    import torch

    model = diffusers_model(autoencoders["kl"])
    model.enable_tiling()
    version = resolve(latent_repo, "kl")
    tiling = version.manifest.autoencoder.tiling
    encoder = open_session(version.graph_path("encoder"), CPU)
    decoder = open_session(version.graph_path("decoder"), CPU)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 4, 20, 28)).astype(np.float32)
    assert tiling.decodes_tiled(20, 28)
    (decoded,) = tiling.decode_tiles(
        lambda z: decoder.run(None, {"latents": np.ascontiguousarray(z)}), latents
    )
    images = rng.uniform(-1, 1, (1, 3, 160, 224)).astype(np.float32)
    mean, logvar = tiling.encode(
        lambda x: tuple(encoder.run(["mean", "logvar"], {"images": np.ascontiguousarray(x)})), images
    )
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
        dist = model.encode(torch.from_numpy(images)).latent_dist
    assert decoded.shape == expected.shape == (2, 3, 160, 224)
    np.testing.assert_allclose(decoded, expected, atol=1e-3, rtol=0)
    np.testing.assert_allclose(mean, dist.mean.numpy(), atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.exp(0.5 * np.clip(logvar, -30, 20)), dist.std.numpy(), atol=1e-3, rtol=0)
    (untiled,) = decoder.run(None, {"latents": latents})
    assert np.abs(untiled - decoded).max() > 1e-3  # the tiles really were blended, not one run


def test_tiled_tiny_equals_diffusers_enable_tiling(latent_repo: Path, autoencoders: dict[str, Path]) -> None:
    import torch

    model = diffusers_model(autoencoders["tiny"])
    model.enable_tiling()
    model.tile_sample_min_size, model.tile_latent_min_size = 128, 16
    version = resolve(latent_repo, "tiny")
    tiling = version.manifest.autoencoder.tiling.with_sample_tile(128)
    encoder = open_session(version.graph_path("encoder"), CPU)
    decoder = open_session(version.graph_path("decoder"), CPU)
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((1, 4, 20, 28)).astype(np.float32)
    images = rng.uniform(-1, 1, (1, 3, 160, 224)).astype(np.float32)
    (decoded,) = tiling.decode(lambda z: decoder.run(None, {"latents": np.ascontiguousarray(z)}), latents)
    mean, stddev = tiling.encode(
        lambda x: tuple(encoder.run(None, {"images": np.ascontiguousarray(x)})), images
    )
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
        expected_latents = model.encode(torch.from_numpy(images)).latents.numpy()
    np.testing.assert_allclose(decoded, expected, atol=1e-3, rtol=0)
    np.testing.assert_allclose(mean, expected_latents, atol=1e-3, rtol=0)
    assert not stddev.any()


def test_tiny_runs_what_fits_a_tile_whole(latent_repo: Path, autoencoders: dict[str, Path]) -> None:
    """An image (a latent) no larger than a tile runs in one call, equal to diffusers' default
    untiled encode (decode): with tiling on, diffusers' AutoencoderTiny would cut a 128² image
    against 128-pixel tiles into four."""
    import torch

    model = diffusers_model(autoencoders["tiny"])
    version = resolve(latent_repo, "tiny")
    tiling = version.manifest.autoencoder.tiling.with_sample_tile(128)
    encoder = open_session(version.graph_path("encoder"), CPU)
    decoder = open_session(version.graph_path("decoder"), CPU)
    shapes = []

    def run(session, name):
        def call(x):
            shapes.append(x.shape)
            return tuple(session.run(None, {name: np.ascontiguousarray(x)}))

        return call

    rng = np.random.default_rng(6)
    images = rng.uniform(-1, 1, (2, 3, 128, 96)).astype(np.float32)
    latents = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    mean, _ = tiling.encode(run(encoder, "images"), images)
    (decoded,) = tiling.decode(run(decoder, "latents"), latents)
    assert shapes == [(2, 3, 128, 96), (1, 4, 16, 16)]
    with torch.no_grad():
        expected_latents = model.encode(torch.from_numpy(images)).latents.numpy()
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(mean, expected_latents, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decoded, expected, atol=1e-4, rtol=0)
    assert tiling.encodes_tiled(136, 96) and tiling.decodes_tiled(16, 17)


def test_tile_sizes_are_checked() -> None:
    from vaeserve.errors import TensorError
    from vaeserve.tiling import Tiling

    tiling = Tiling("kl", 512, 64, 0.25, 8)
    assert tiling.with_sample_tile(256).latent_tile == 32
    with pytest.raises(TensorError, match="multiple of 8"):
        tiling.with_sample_tile(100)


def test_import_refuses_what_it_cannot_take(tmp_path: Path, autoencoders: dict[str, Path]) -> None:
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((autoencoders["kl"] / "config.json").read_text())
    cases = [
        (
            unet,
            [],
            "config.json names a UNet2DConditionModel; vae import takes AutoencoderKL or AutoencoderTiny",
        ),
        (pipeline, [], "no config.json (found: model_index.json, vae)"),
        (bare, [], "AutoencoderKL config but no weights"),
        (autoencoders["kl"], ["--variants", "int8"], "an imported autoencoder has fp16"),
        (autoencoders["kl"], ["--name", "bad/name"], "model name 'bad/name'"),
    ]
    for folder, extra, fragment in cases:
        args = ["import", "--diffusers", str(folder), "--repo", str(tmp_path / "repo")]
        result = vae(*args, *(extra if "--name" in extra else ["--name", "m", *extra]))
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "repo" / "m").exists() or not any((tmp_path / "repo" / "m").iterdir())


# -- served: OIP over REST (tritonclient's binary tensors, and plain JSON) and gRPC -----------------
@pytest.fixture(scope="module")
def latent_server(latent_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    import servers

    folder = tmp_path_factory.mktemp("latent_serve")
    server = servers.start(latent_repo, folder / "serve.log", "--max-request-pixels", "200000")
    yield server
    assert server.stop() == 0, server.output()


def rest(server, model: str, inputs: dict[str, np.ndarray], parameters=None, outputs=None) -> dict:
    tritonclient_http = pytest.importorskip("tritonclient.http")
    client = tritonclient_http.InferenceServerClient(server.http)
    given = []
    for name, array in inputs.items():
        datatype = {"float32": "FP32", "uint8": "UINT8", "float16": "FP16", "int64": "INT64"}[
            array.dtype.name
        ]
        tensor = tritonclient_http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        given.append(tensor)
    asked = (
        [tritonclient_http.InferRequestedOutput(n, binary_data=True) for n in outputs] if outputs else None
    )
    result = client.infer(model, given, outputs=asked, parameters=parameters)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def rest_error(server, model: str, body: dict) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://{server.http}/v2/models/{model}/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]
    raise AssertionError("accepted")


def test_served_encode_and_decode_equal_diffusers(latent_server, autoencoders: dict[str, Path]) -> None:
    """The judged path: uint8 pixels over OIP REST give diffusers' latent_dist of p / 127.5 − 1;
    latents give decode(z).sample; both within 1e-4."""
    import torch

    model = diffusers_model(autoencoders["kl"])
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, (2, 3, 48, 64), dtype=np.uint8)
    latents = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
    encoded = rest(latent_server, "kl-encoder", {"x": pixels})
    decoded = rest(latent_server, "kl-decoder", {"z": latents})
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1)).latent_dist
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(encoded["mean"], dist.mean.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(encoded["stddev"], dist.std.numpy(), atol=1e-4, rtol=0)
    assert decoded["images"].shape == (2, 3, 48, 40)
    np.testing.assert_allclose(decoded["images"], expected, atol=1e-4, rtol=0)
    # float32 in [−1, 1] is read as is; FP16 too
    as_floats = rest(latent_server, "kl-encoder", {"x": pixels.astype(np.float32) / 127.5 - 1})
    np.testing.assert_allclose(as_floats["mean"], encoded["mean"], atol=1e-5, rtol=0)
    half = rest(latent_server, "kl-decoder", {"z": latents.astype(np.float16)})
    np.testing.assert_allclose(half["images"], expected, atol=2e-2, rtol=0)


def test_served_tiled_decode_equals_diffusers_tiling(latent_server, autoencoders: dict[str, Path]) -> None:
    import torch

    model = diffusers_model(autoencoders["kl"])
    model.enable_tiling()
    latents = np.random.default_rng(12).standard_normal((1, 4, 20, 28)).astype(np.float32)
    decoded = rest(latent_server, "kl-decoder", {"z": latents})["images"]
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(decoded, expected, atol=1e-3, rtol=0)
    # a request's tile size: tiles of 128 pixels (16 latents) blend elsewhere, as diffusers' would
    model.tile_sample_min_size, model.tile_latent_min_size = 128, 16
    retiled = rest(latent_server, "kl-decoder", {"z": latents}, parameters={"tile_size": 128})["images"]
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(retiled, expected, atol=1e-3, rtol=0)
    assert np.abs(retiled - decoded).max() > 1e-3


def test_pipeline_latents_and_the_tiny_model(latent_server, autoencoders: dict[str, Path]) -> None:
    import torch

    rng = np.random.default_rng(13)
    pixels = rng.integers(0, 256, (1, 3, 32, 40), dtype=np.uint8)
    own = rest(latent_server, "kl-encoder", {"x": pixels})["mean"]
    scaled = rest(latent_server, "kl-encoder", {"x": pixels}, parameters={"pipeline_latents": True})["mean"]
    scale, shift = KL_CONFIG["scaling_factor"], KL_CONFIG["shift_factor"]
    np.testing.assert_allclose(scaled, (own - shift) * scale, atol=1e-5, rtol=0)
    back = rest(latent_server, "kl-decoder", {"z": scaled}, parameters={"pipeline_latents": True})["images"]
    direct = rest(latent_server, "kl-decoder", {"z": own})["images"]
    np.testing.assert_allclose(back, direct, atol=1e-4, rtol=0)
    tiny = diffusers_model(autoencoders["tiny"])
    encoded = rest(latent_server, "tiny-encoder", {"x": pixels})
    with torch.no_grad():
        expected = tiny.encode(torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1)).latents.numpy()
    np.testing.assert_allclose(encoded["mean"], expected, atol=1e-4, rtol=0)
    assert not encoded["stddev"].any()
    out = rest(latent_server, "tiny-reconstruct", {"x": pixels})
    assert out["images"].shape == (1, 3, 32, 40) and out["latents"].shape == (1, 4, 4, 5)
    drawn = rest(
        latent_server,
        "kl-sample-prior",
        {"count": np.array([2], np.int64)},
        parameters={"seed": 5, "height": 3, "width": 4},
    )
    assert drawn["latents"].shape == (2, 4, 3, 4) and drawn["images"].shape == (2, 3, 24, 32)
    with torch.no_grad():
        expected = (
            # a copy: the REST client's arrays are read-only views of the response, which torch warns of
            diffusers_model(autoencoders["kl"]).decode(torch.tensor(drawn["latents"])).sample.numpy()
        )
    np.testing.assert_allclose(drawn["images"], expected, atol=1e-4, rtol=0)


def test_served_metadata_and_refusals(latent_server) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://{latent_server.http}/v2/models/kl-encoder", timeout=30) as response:
        metadata = json.loads(response.read())
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    assert {o["name"]: o["shape"] for o in metadata["outputs"]}["mean"] == [-1, 4, -1, -1]

    def body(shape, datatype="UINT8", parameters=None):
        import math

        tensor = {"name": "x", "datatype": datatype, "shape": shape, "data": [0] * math.prod(shape)}
        return {"inputs": [tensor], **({"parameters": parameters} if parameters else {})}

    cases = [
        ("kl-score", body([1, 3, 16, 16]), 501, "defines no likelihood"),
        ("kl-encoder", body([1, 3, 20, 16]), 400, "multiples of 8"),
        ("kl-encoder", body([1, 16, 16, 3]), 400, "channels last? array.transpose(0, 3, 1, 2)"),
        ("kl-encoder", body([1, 3, 512, 512]), 400, "more than this server's limit of 600,000"),
        ("kl-encoder", body([1, 3, 16, 16], parameters={"tile_size": 100}), 400, "multiple of 8"),
        ("kl-encoder", body([1, 3, 16, 16], parameters={"strength": 1}), 400, "pipeline_latents"),
    ]
    for model, request, status, fragment in cases:
        code, message = rest_error(latent_server, model, request)
        assert code == status and fragment in message, (model, code, message)
    floats = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [2.0] * 192}]}
    code, message = rest_error(latent_server, "kl-encoder", floats)
    assert code == 400 and "expected [-1, 1]" in message


def test_served_over_oip_grpc(latent_server, autoencoders: dict[str, Path]) -> None:
    tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
    client = tritonclient_grpc.InferenceServerClient(latent_server.target)
    latents = np.random.default_rng(14).standard_normal((1, 4, 5, 6)).astype(np.float32)
    tensor = tritonclient_grpc.InferInput("z", list(latents.shape), "FP32")
    tensor.set_data_from_numpy(latents)
    images = client.infer("kl-decoder", [tensor]).as_numpy("images")
    np.testing.assert_allclose(images, rest(latent_server, "kl-decoder", {"z": latents})["images"], atol=1e-6)


def test_served_over_vae_v1(latent_server, autoencoders: dict[str, Path]) -> None:
    """vae.v1's Encode, Decode, Reconstruct, SamplePrior carry images of any size and the
    autoencoder's options; Score is UNIMPLEMENTED; GetModelInfo names the family."""
    import grpc

    from vaeserve._proto import vae_pb2, vae_pb2_grpc
    from vaeserve.codec import from_response, to_tensor

    rng = np.random.default_rng(15)
    pixels = rng.integers(0, 256, (2, 3, 32, 24), dtype=np.uint8)
    with grpc.insecure_channel(latent_server.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        options = vae_pb2.AutoencoderOptions(pipeline_latents=True)
        inputs = to_tensor(pixels)
        encoded = stub.Encode(vae_pb2.EncodeRequest(model="kl", inputs=inputs, autoencoder=options))
        mean = from_response(encoded.mean, "mean")
        scaled = {"pipeline_latents": True}
        rest_mean = rest(latent_server, "kl-encoder", {"x": pixels}, parameters=scaled)["mean"]
        np.testing.assert_allclose(mean, rest_mean, atol=1e-6)
        decoded = stub.Decode(vae_pb2.DecodeRequest(model="kl", latents=to_tensor(mean), autoencoder=options))
        images = from_response(decoded.images, "images")
        assert images.shape == (2, 3, 32, 24) and not decoded.HasField("probs")
        again = stub.Reconstruct(
            vae_pb2.ReconstructRequest(model="kl", inputs=inputs, use_mean=True, autoencoder=options)
        )
        np.testing.assert_allclose(from_response(again.images, "images"), images, atol=1e-5)
        sizes = vae_pb2.AutoencoderOptions(latent_height=2, latent_width=3)
        drawn = stub.SamplePrior(vae_pb2.SamplePriorRequest(model="tiny", count=3, seed=1, autoencoder=sizes))
        assert from_response(drawn.images, "images").shape == (3, 3, 16, 24)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(vae_pb2.ScoreRequest(model="kl", inputs=to_tensor(pixels)))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "defines no likelihood" in refused.value.details()
        info = {m.name: m for m in stub.GetModelInfo(vae_pb2.GetModelInfoRequest()).models}
        assert info["kl"].family == "autoencoder" and info["kl"].latent_size == 4
        assert info["kl"].likelihood == "none"


def test_a_vae_refuses_an_autoencoders_options(serve) -> None:
    """Asked of a VAE trained here, pipeline_latents is refused rather than ignored."""
    server = serve()
    body = {
        "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}],
        "parameters": {"pipeline_latents": True},
    }
    code, message = rest_error(server, "tiny-encoder", body)
    assert code == 400 and "apply to imported autoencoders" in message


def test_the_python_client_on_an_autoencoder(latent_server) -> None:
    """VaeClient takes [N, H, W, 3] as numpy holds photographs, asks the model's family once,
    and answers in the autoencoder's shapes, split into calls of about a megapixel."""
    from vaeserve.client import VaeClient

    rng = np.random.default_rng(16)
    photos = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    channels_first = np.ascontiguousarray(photos.transpose(0, 3, 1, 2))
    with VaeClient(latent_server.target, model="kl", chunk_rows=2) as client:
        encoded = client.encode(photos, pipeline_latents=True)
        expected = rest(
            latent_server, "kl-encoder", {"x": channels_first}, parameters={"pipeline_latents": True}
        )
        np.testing.assert_allclose(encoded["mean"], expected["mean"], atol=1e-6)
        decoded = client.decode(encoded["mean"], pipeline_latents=True)["images"]
        assert decoded.shape == (3, 3, 40, 56)
        rebuilt = client.reconstruct(photos, use_mean=True)
        assert rebuilt["images"].shape == (3, 3, 40, 56) and rebuilt["latents"].shape == (3, 4, 5, 7)
        drawn = client.sample_prior(2, seed=3, latent_height=4, latent_width=2)
        assert drawn["images"].shape == (2, 3, 32, 16)
        assert client.model_reached()["family"] == "autoencoder"


def test_embed_a_folder_of_colour_pngs_gives_diffusers_latents(
    latent_repo: Path, latent_server, autoencoders: dict[str, Path], tmp_path: Path
) -> None:
    """`vae embed` of PNG files, in-process and through the service: diffusers' latent_dist of
    the same pixels, [N, C, h, w] per row; a .npy of [N, H, W, 3] the same; pipeline latents
    scaled; an image of another size refused, naming it."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(17)
    photos = rng.integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"{i:02d}.png")
    np.save(tmp_path / "photos.npy", photos)
    model = diffusers_model(autoencoders["kl"])
    with torch.no_grad():
        dist = model.encode(
            torch.from_numpy(photos.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
        ).latent_dist
    expected_mean, expected_stddev = dist.mean.numpy(), dist.std.numpy()
    runs = {
        "local": ["--input", str(folder)],
        "service": ["--input", str(folder), "--server", latent_server.target],
        "npy": ["--input", str(tmp_path / "photos.npy"), "--chunk-rows", "2"],
    }
    for name, args in runs.items():
        output = tmp_path / f"{name}.npy"
        result = vae(
            "embed",
            "--model",
            str(latent_repo / "kl"),
            *args,
            "--output",
            str(output),
            "--stddev",
            "--no-progress",
        )
        assert result.returncode == 0, result.stderr
        records = np.load(output)
        assert records["mean"].shape == (5, 4, 4, 6), name
        np.testing.assert_allclose(records["mean"], expected_mean, atol=1e-4, rtol=0, err_msg=name)
        np.testing.assert_allclose(records["stddev"], expected_stddev, atol=1e-4, rtol=0, err_msg=name)
        sidecar = json.loads((tmp_path / f"{name}.npy.manifest.json").read_text())
        assert sidecar["latent_shape"] == [4, 4, 6] and sidecar["rows"] == 5
    scaled = tmp_path / "scaled.parquet"
    result = vae(
        "embed",
        "--model",
        str(latent_repo / "kl"),
        "--input",
        str(folder),
        "--output",
        str(scaled),
        "--pipeline-latents",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    flat = np.stack(pq.read_table(scaled).column("mean").to_numpy(zero_copy_only=False))
    pipeline = (expected_mean - KL_CONFIG["shift_factor"]) * KL_CONFIG["scaling_factor"]
    np.testing.assert_allclose(flat.reshape(5, 4, 4, 6), pipeline, atol=1e-4, rtol=0)
    Image.fromarray(photos[0][:16]).save(folder / "99.png")
    result = vae(
        "embed",
        "--model",
        str(latent_repo / "kl"),
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "mixed.npy"),
        "--no-progress",
    )
    assert (
        result.returncode == 1 and "99.png: 16×48 pixels" in result.stderr and "--image-size" in result.stderr
    )


def test_vae_client_shows_an_autoencoder(latent_server, tmp_path: Path) -> None:
    """`vae client` on an imported model: a photograph (a crop of matplotlib's sample) encoded and
    decoded, its latents' channels and prior latents decoded, as PNGs and summary.json."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        image.convert("RGB").crop((200, 100, 300, 200)).save(tmp_path / "photo.png")  # 100 × 100
    out = tmp_path / "demo"
    result = vae(
        "client",
        "--target",
        latent_server.target,
        "--model",
        "kl",
        "--image",
        str(tmp_path / "photo.png"),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_shape"] == [96, 96, 3] and summary["latent_shape"] == [4, 12, 12]
    assert np.isfinite(summary["reconstruction_psnr_db"])
    assert summary["pictures"] == ["latents.png", "reconstruct.png", "sample_prior.png"]
    assert "reconstruction PSNR" in result.stdout


def test_the_console_shows_an_autoencoder(latent_server, tmp_path: Path) -> None:
    """The console on an imported model in headless Chromium: prior latents decoded as the
    service's seeded SamplePrior decodes them; a photograph uploaded at its own size, reconstructed
    (pixels = the service's Reconstruct, PSNR as `vae client` computes it) with its latent's
    channels; an interpolation from it decoded at its size, its first step its reconstruction.
    The VAE-only controls (draws from p(x|z), importance samples, traversals) are hidden."""
    from matplotlib import cbook
    from PIL import Image

    from vaeserve import sandbox

    missing = sandbox.chromium_missing()
    if missing:
        pytest.skip(missing)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        photo = np.asarray(image.convert("RGB").crop((200, 100, 296, 180)))  # 96 × 80: multiples of 8
    Image.fromarray(photo).save(tmp_path / "photo.png")
    pixels = np.ascontiguousarray(photo.transpose(2, 0, 1)[None])  # [1, 3, 80, 96]
    prior = rest(
        latent_server,
        "kl-sample-prior",
        {"count": np.array([4], np.int64)},
        {"seed": 3, "height": 8, "width": 8},
    )
    rebuilt = rest(latent_server, "kl-reconstruct", {"x": pixels}, {"use_mean": True})

    def shown(images: np.ndarray) -> np.ndarray:  # [N, 3, H, W] in [−1, 1] → RGB bytes [N, H, W, 3]
        return np.round(255 * np.clip((images.transpose(0, 2, 3, 1) + 1) / 2, 0, 1)).astype(np.int16)

    driver = sandbox.start_chromium()
    try:
        js = driver.execute_script

        def wait(check, timeout: float = 60):
            return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: check())

        def drawn(selector: str) -> list[tuple[int, int, np.ndarray]]:
            canvases = js(
                "return [...document.querySelectorAll(arguments[0])].map(c => [c.width, c.height, "
                "Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)])",
                selector,
            )
            return [(w, h, np.array(rgba, np.int16).reshape(h, w, 4)[..., :3]) for w, h, rgba in canvases]

        def choose(element_id: str, value: str) -> None:
            js(
                "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                "e.dispatchEvent(new Event('change'))",
                element_id,
                value,
            )

        driver.get(f"http://{latent_server.http}/")
        wait(lambda: js("return document.getElementById('model').options.length") == 2)
        choose("model", "kl")
        assert js("return document.getElementById('sample-size').value") == "8"  # the test model's tile
        assert js("return document.getElementById('traverse-form').offsetParent") is None  # hidden
        assert js("return document.getElementById('sample-show').offsetParent") is None
        cells = js("return [...document.querySelectorAll('#model-table tbody tr')].map(r => r.innerText)")
        assert any("imported AutoencoderKL" in row and "4×H/8×W/8" in row for row in cells), cells

        choose("sample-seed", "3")
        js("document.getElementById('sample-form').requestSubmit()")
        wait(lambda: js("return document.getElementById('sample-grid').dataset.seed") == "3")
        samples = drawn("#sample-grid canvas")
        assert [(w, h) for w, h, _ in samples] == [(64, 64)] * 4
        assert np.abs(np.stack([rgb for _, _, rgb in samples]) - shown(prior["images"])).max() <= 1

        driver.find_element(By.ID, "input-file").send_keys(str(tmp_path / "photo.png"))
        wait(lambda: js("return document.querySelectorAll('#input-image canvas').length") == 1)
        [(w, h, sent)] = drawn("#input-image canvas")
        assert (w, h) == (96, 80) and np.array_equal(sent, photo)
        js("document.getElementById('input-form').requestSubmit()")
        wait(lambda: js("return document.getElementById('input-scores').dataset.psnr") is not None)
        [(w, h, reconstruction)] = drawn("#input-reconstruction canvas")
        assert (w, h) == (96, 80)
        assert np.abs(reconstruction - shown(rebuilt["images"])[0]).max() <= 1
        expected = np.clip((rebuilt["images"][0].transpose(1, 2, 0) + 1) / 2, 0, 1)
        psnr = 10 * np.log10(1 / np.mean((expected - photo / 255) ** 2))
        assert abs(float(js("return document.getElementById('input-scores').dataset.psnr")) - psnr) < 0.01
        assert [(w, h) for w, h, _ in drawn("#input-latents canvas")] == [(12, 10)] * 4

        choose("latent-a", "input")
        choose("latent-steps", "3")
        js("document.getElementById('latent-form').requestSubmit()")
        wait(lambda: js("return document.querySelectorAll('#latent-strip canvas').length") == 3)
        strip = drawn("#latent-strip canvas")
        assert [(w, h) for w, h, _ in strip] == [(96, 80)] * 3
        assert np.abs(strip[0][2] - reconstruction).max() <= 1  # z = your input's mean: its reconstruction
        assert np.abs(strip[2][2] - strip[0][2]).max() > 20  # the other end is a prior draw
        assert js("return document.getElementById('status').textContent") == "ready"
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()
