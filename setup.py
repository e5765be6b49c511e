"""Generates the gRPC stubs from protos/ at build and install time (editable installs too).

protoc writes ``vae/v1/vae_pb2*.py``; we place them in ``vaeserve/_proto/`` and point the
service stub's import at that package, so the public proto path (``vae/v1/vae.proto``,
package ``vae.v1``) stays what clients in other languages see.
"""

import re
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO = "vae/v1/vae.proto"
TARGET = ROOT / "vaeserve" / "_proto"


def generate_stubs() -> None:
    from grpc_tools import protoc

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
                str(ROOT / "protos" / PROTO),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on protos/{PROTO}")
        for generated in (Path(out) / "vae" / "v1").iterdir():
            text = generated.read_text()
            text = re.sub(r"^from vae\.v1 import", "from vaeserve._proto import", text, flags=re.M)
            (TARGET / generated.name).write_text(text)


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
