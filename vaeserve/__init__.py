"""vaeserve: train a variational autoencoder, export it to ONNX, serve it over gRPC.

The core package (this folder) holds the code every stage shares and that needs
no torch: dataset readers, the numpy ELBO/NLL maths, the generic evaluator and
the pictures. The stages live in the top-level folders ``training/``,
``export/`` and ``service/`` and are installed as ``vaeserve.training``,
``vaeserve.export`` and ``vaeserve.service`` (see pyproject.toml).
"""

from importlib.metadata import version

# pyproject.toml holds the one version (static, so the lock needs no build to read it).
__version__ = version("vaeserve")
