"""The failures vaeserve explains to its users.

Each is raised with a message that says what was wrong and what was expected;
the CLI prints it as one line (``vae: error: ...``) and exits non-zero. Anything
that is not a ``VaeError`` is a bug and keeps its traceback.
"""

import importlib.util


def first_line(exc: BaseException) -> str:
    """A library exception's first line, to quote inside one of our one-line messages."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# How the server's NOT_FOUND for an unregistered shared-memory region begins its reason; the
# client, seeing it, registers its region again (a restarted server, another worker).
UNKNOWN_REGION = "no region named"


class VaeError(Exception):
    """Base class of every user-facing failure."""


class DataError(VaeError):
    """An input file or array is missing, corrupt or of the wrong shape."""


class DatasetUnavailableError(VaeError):
    """A dataset could not be found locally nor downloaded."""


class ConfigError(VaeError):
    """A configuration value, flag or config file is invalid."""


class CheckpointError(VaeError):
    """A checkpoint or run directory is missing, foreign or inconsistent."""


class RepositoryError(VaeError):
    """A model repository, version or file is missing, tampered with or inconsistent."""


class StorageError(VaeError):
    """An object store refused or could not be reached: no credentials, no bucket, no object."""


class ClusterError(VaeError):
    """A Ray cluster could not be reached, or lost a task more times than it retries."""


class DiskFullError(VaeError):
    """The device (or quota) holding a file being written is full; what was complete stays."""


class ExportError(VaeError):
    """An export check failed; nothing was written to the repository."""


class TensorError(VaeError):
    """A tensor on the wire has the wrong shape, dtype, byte length or values."""


class UnsupportedError(VaeError):
    """A call the model does not define: Score of an imported autoencoder, which has no p(x|z)."""


class ModelNotFoundError(VaeError):
    """A request names a model or version that is not loaded."""


class MissingExtraError(VaeError):
    """A command needs an optional dependency group that is not installed."""

    def __init__(self, command: str, extra: str, module: str) -> None:
        super().__init__(
            f"{command} needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'vaeserve[{extra}]'"
        )


def require(command: str, extra: str, *modules: str) -> None:
    """Fail early, naming the extra to install, when a command's optional modules are missing."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(command, extra, module)


class RequestError(VaeError):
    """A request is malformed apart from its tensors: bad JSON, parameters or requested outputs."""
