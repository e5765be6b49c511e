"""The Open Inference Protocol's model repository extension: index, load and unload by hand.

A thin translation, for the gRPC and HTTP front ends alike, onto the model manager (which
owns every load and unload); behind the admin token (service.policy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from vaeserve.errors import ModelNotFoundError, RequestError
from vaeserve.service.errors import AdminDisabledError
from vaeserve.service.manager import ModelManager

# What Triton's clients send with an unload: vaeserve's models have no dependents to unload.
IGNORED_REPOSITORY_PARAMETERS = frozenset({"unload_dependents"})


class RepositoryExtension:
    """OIP's model repository extension, for both front ends, over the model manager: the
    repository's own model names (NAME, not NAME-encoder), one repository, no parameters."""

    def __init__(self, manager: ModelManager, enabled: bool, repository: str) -> None:
        self.manager, self.enabled, self.repository = manager, enabled, repository

    def index(self, repository: str, ready_only: bool) -> list[dict[str, str]]:
        self._check(repository, {})
        return self.manager.index(ready_only)

    async def load(self, repository: str, name: str, parameters: Mapping) -> None:
        self._check(repository, parameters)
        # A caller that leaves (REST handlers are cancelled then) does not cut a load in half.
        await asyncio.shield(self.manager.load_model(name))

    async def unload(self, repository: str, name: str, parameters: Mapping) -> None:
        self._check(repository, parameters)
        await asyncio.shield(self.manager.unload_model(name))

    def _check(self, repository: str, parameters: Mapping) -> None:
        if not self.enabled:
            raise AdminDisabledError(
                "the model repository extension is off: start the server with --admin-token-file"
            )
        if repository not in ("", self.repository):
            raise ModelNotFoundError(f"repository {repository!r}: this server serves {self.repository!r}")
        unknown = set(parameters) - IGNORED_REPOSITORY_PARAMETERS
        if unknown:
            raise RequestError(
                f"parameters {sorted(unknown)}: none are taken here (a model loads from its folder "
                "as exported; no config or files in the request)"
            )
