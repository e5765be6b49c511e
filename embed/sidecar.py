"""The sidecar ``DST.manifest.json`` of an embed or score job: one typed record.

It names the model (name, version, encoder SHA-256), the input (path and fingerprint), the
chunking and the fields, and says ``completed`` only once the final file holds every row in
input order. ``--resume`` continues a job whose sidecar matches, skipping chunks already
written; anything else that would touch an existing output needs ``--force``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from vaeserve import __version__
from vaeserve.errors import ConfigError
from vaeserve.storage import Location, ObjectPath, write_whole

# What a resumed job must share with the one it continues.
RESUME_KEYS = ("model", "input", "rows", "chunk_rows", "fields", "score")


@dataclass(frozen=True)
class Sidecar:
    model: dict[str, Any]  # name, version, encoder_sha256
    engine: str
    input: dict[str, Any]  # the source's fingerprint
    rows: int
    chunk_rows: int
    chunks: int
    fields: list[str]
    score: dict[str, Any] | None  # vae score: iw_samples, seed, decoder_sha256, likelihood
    latent_size: int
    output: str
    latent_shape: list[int] | None = None  # an imported autoencoder's [C, h, w] per row
    pipeline_latents: bool = False  # its latents as a pipeline's, (z − shift) · scale
    vaeserve_version: str = __version__
    completed: bool = False
    finished: str | None = None  # when it completed, ISO 8601

    @staticmethod
    def path(output: Location) -> Location:
        return output.with_name(output.name + ".manifest.json")

    @classmethod
    def read(cls, output: Location) -> Sidecar | None:
        """The sidecar of ``output``; None when there is none."""
        path = cls.path(output)
        try:
            if isinstance(path, ObjectPath) and not path.exists():
                return None
            raw = json.loads(path.read_text())
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a job's sidecar ({exc}); pass --force to start over") from None

    def write(self, output: Location) -> None:
        """Written whole and renamed into place (on object storage: one upload)."""
        write_whole(self.path(output), (json.dumps(dataclasses.asdict(self), indent=2) + "\n").encode())

    def completed_at(self, when: str) -> Sidecar:
        return dataclasses.replace(self, completed=True, finished=when)

    def differences(self, other: Sidecar) -> list[str]:
        """The keys a resumed job must share with ``other`` on which they differ."""
        return [key for key in RESUME_KEYS if getattr(self, key) != getattr(other, key)]
