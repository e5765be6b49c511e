"""Generates the gRPC stubs from protos/ at build and install time (editable installs too).

protoc writes ``vae/v1/vae_pb2*.py`` and ``inference/grpc_predict_v2_pb2*.py``; we place them
in ``vaeserve/_proto/`` and point the service stubs' imports at that package, so the public
proto paths (``vae/v1/vae.proto``, package ``vae.v1``; ``inference/grpc_predict_v2.proto``,
package ``inference``, the Open Inference Protocol) stay what clients in other languages see.
"""

import re
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTOS = ("vae/v1/vae.proto", "inference/grpc_predict_v2.proto")
TARGET = ROOT / "vaeserve" / "_proto"


def generate_stubs() -> None:
    for proto in PROTOS:
        generate(proto)


def generate(proto: str) -> None:
    from grpc_tools import protoc

    package = str(Path(proto).parent)
    with tempfile.TemporaryDirectory() as out:
        include = str(Path(protoc.__file__).parent / "_proto")
        code = protoc.main(
            [
                "protoc",
                f"-I{ROOT / 'protos'}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(ROOT / "protos" / proto),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on protos/{proto}")
        importer = re.compile(rf"^from {re.escape(package.replace('/', '.'))} import", re.M)
        for generated in (Path(out) / package).iterdir():
            text = importer.sub("from vaeserve._proto import", generated.read_text())
            (TARGET / generated.name).write_text(text)


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
