"""The one owner of the model repository at run time: load, verify, warm up, poll, label,
unload and retire.

At start every version ``--model``/``--version`` ask for is verified (manifest, sizes,
checksums), opened and warmed up; the supervisor of ``--workers`` checks the same before any
worker starts (``find_servable``). While the server runs the served versions follow the folder.
With ``--poll-s`` the repository is scanned every so many seconds, and the registry moves
towards what it holds:

- a new version (an export's atomic rename is what makes it appear: staging folders are not
  versions) is loaded and verified exactly as at start, warmed up, and only then added, so
  ``latest`` moves to it once it is ready;
- a version whose folder is gone is retired: new calls stop reaching it, calls in flight finish
  with it, and its sessions are released with the last reference. A model's last loaded version
  and a version a label points at are kept (with one log line) rather than serving none;
- with ``--version latest`` a newer version replaces the one served, once it is ready;
- a version that fails verification is refused with one log line and not tried again until its
  folder changes; what was served stays served;
- a loaded version whose files changed on disk (any file overwritten in place: the poll compares
  every file's inode, size and times) is verified again: served from the new files if they
  verify, retired if not (its model's last version too: a worker started now could not load it);
- each model's ``labels.json`` is read again; a label naming a version that is not loaded is
  refused with one log line, and the labels in effect stay.

Operators may also load and unload models by hand (OIP's model repository extension, behind the
admin token); a model unloaded so stays unloaded, polls included, until it is loaded again.
With ``--workers`` the supervisor decides what is served at start (``ServedSet``, in the folder it
shares with its workers): without ``--poll-s`` every worker it starts or restarts serves exactly
that; with it, each worker polls on its own and all reach the same set within a poll. A hand-made
change is written to the shared folder too, which each worker reads every second.
Metrics count loads, refusals and retirements (``vaeserve_repository_events_total``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from vaeserve.atomic import atomic_write_text
from vaeserve.errors import ModelNotFoundError, RepositoryError, VaeError
from vaeserve.manifest import Manifest
from vaeserve.repository import (
    LABELS,
    TRAFFIC,
    ModelVersion,
    load_version,
    model_names,
    read_labels,
    read_traffic,
    version_numbers,
)
from vaeserve.runtime import CPU, OnnxPair
from vaeserve.service.autoencoders import Served, ServedAutoencoder
from vaeserve.service.batching import Observer
from vaeserve.service.cache import ResponseCache, version_key
from vaeserve.service.dataplane import ModelRegistry, ServedModel
from vaeserve.service.metrics import Metrics
from vaeserve.service.residency import Residency
from vaeserve.service.settings import ServeSettings
from vaeserve.service.shadow import Mirror

log = logging.getLogger("vaeserve.service")
# Set by the --workers supervisor: a folder its workers share for operators' loads and unloads.
SHARED_UNLOADS_ENV = "VAESERVE_CONTROL_DIR"
UNLOADED = "unloaded.json"
SERVED = "served.json"
SHARED_UNLOADS_POLL_S = 1.0


class ModelManager:
    def __init__(self, settings: ServeSettings, executor: Executor, metrics: Metrics) -> None:
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.observer: Observer = metrics
        # One response cache for every version this process serves (--cache-mb; None: off).
        self.cache = ResponseCache(settings.cache_mb << 20, metrics) if settings.cache_mb else None
        self.mirror = Mirror(metrics)  # copies of calls for traffic splits' shadows (vae traffic)
        self.residency = Residency(self, settings.max_loaded_models, settings.max_loaded_mb << 20)
        self.registry = self._load_all()
        self.metrics.models.set(len(self.registry.all()))
        self.unloaded: set[str] = set()  # by an operator: polls leave these models alone
        shared = os.environ.get(SHARED_UNLOADS_ENV)
        self.shared_unloads = Path(shared) / UNLOADED if shared else None
        # Versions refused, by folder, with the signature they were refused at: tried again
        # only once the folder changes. Likewise what was reported about labels and kept versions.
        self.refused: dict[Path, tuple] = {}
        self.reported: dict[str, object] = {}
        # Each loaded version's folder as it was when loaded: a poll that finds it changed (a file
        # overwritten in place) loads it again, or retires it if it no longer verifies.
        self.loaded_at: dict[tuple[str, int], tuple] = {
            (m.version.name, m.version.version): _signature(m.version.path) for m in self.registry.all()
        }

    # -- at start ---------------------------------------------------------------------------------
    def _load_all(self) -> ModelRegistry:
        found = self._decided() or find_servable(self.settings, log_refusals=True)
        evicted = self._not_resident_at_start(found)
        models: dict[str, dict[int, Served]] = {}
        for name, versions in found.items():
            if name in evicted:
                continue
            for number, version in versions.items():
                served = self._load_one(name, number, version)
                if served is not None:
                    models.setdefault(name, {})[number] = served
        if not models:
            raise VaeError(
                f"no servable model in {self.settings.folder} (model {self.settings.model or 'any'}, "
                f"version {self.settings.version}): onnxruntime could not open any; see the log lines above"
            )
        registry = ModelRegistry(models, self._default_model({**models, **dict.fromkeys(evicted)}))
        registry.evicted, registry.residency = evicted, self.residency
        for name in models:
            try:
                registry.set_labels(name, read_labels(self.settings.folder / name))
            except RepositoryError as exc:
                log.error("refusing the labels of %s: %s", name, exc)
            try:
                registry.set_traffic(name, read_traffic(self.settings.folder / name))
            except RepositoryError as exc:
                log.error("refusing the traffic split of %s: %s", name, exc)
        return registry

    def _not_resident_at_start(self, found: dict[str, dict[int, ModelVersion]]) -> set[str]:
        """With bounded residency, the models not loaded at start: the default model first, then
        by name, are loaded while they fit; the rest wait for a call."""
        if not self.residency.bounded:
            return set()
        first = self.settings.model or self.settings.default_model
        order = sorted(found, key=lambda name: (name != first, name))
        resident: dict[str, int] = {}
        for name in order:
            size = sum(_graph_bytes(version.manifest) for version in found[name].values())
            if not self.residency.fits(resident, size):
                break
            resident[name] = size
        later = set(found) - set(resident)
        if later:
            log.info(
                "bounded residency: loading %s now; %s on their first call",
                ", ".join(resident),
                ", ".join(sorted(later)),
            )
        return later

    # -- bounded residency (service.residency) -----------------------------------------------------
    def model_bytes(self, name: str) -> int:
        """The graph bytes of the versions of ``name`` this server would load."""
        folder = self.settings.folder / name
        # The manifests' recorded sizes: no graph is read or hashed to learn them
        return sum(_graph_bytes(Manifest.read(folder / str(n))) for n in wanted_versions(self.settings, name))

    def resident_bytes(self) -> dict[str, int]:
        return {
            name: sum(_graph_bytes(served.version.manifest) for served in versions.values())
            for name, versions in self.registry.models.items()
        }

    def evict(self, name: str, why: str) -> None:
        for number in sorted(self.registry.models.get(name, {})):
            self._retire(name, number)
        self.registry.evicted.add(name)
        log.info("evicted %s (%s; --max-loaded-models %d, --max-loaded-mb %d)", name, why,
                 self.settings.max_loaded_models, self.settings.max_loaded_mb)  # fmt: skip

    async def load_resident(self, name: str) -> None:
        """Every version of ``name`` this server would serve, loaded and warmed up; a version
        that does not verify is refused as at start (RepositoryError if none loads)."""
        loop = asyncio.get_running_loop()
        for number in wanted_versions(self.settings, name):
            path = self.settings.folder / name / str(number)
            signature = _signature(path)
            served = await loop.run_in_executor(self.executor, self._warm, name, number)
            if served is None:
                self.refused[path] = signature
                self.metrics.repository_event("refused")
                continue
            self._add(served, signature)
        if name not in self.registry.models:
            raise RepositoryError(f"model {name!r}: no version of it loads now (see the server log)")
        self.registry.evicted.discard(name)
        self._follow_labels(name)
        self._follow_traffic(name)

    def _decided(self) -> dict[str, dict[int, ModelVersion]] | None:
        """A --workers worker that does not poll serves the versions its supervisor decided on
        at start (ServedSet), not what the folder holds when it (re)starts: a worker restarted
        after a new version appeared, or after a file changed in place, would otherwise serve
        what the others do not. A decided version that no longer verifies stops this worker
        (and, as it keeps failing, the service): it cannot serve what the others serve."""
        shared = os.environ.get(SHARED_UNLOADS_ENV)
        if self.settings.poll_s or not shared:
            return None
        decided = ServedSet.read(Path(shared))
        if decided is None:
            return None
        found: dict[str, dict[int, ModelVersion]] = {}
        for name, numbers in decided.versions.items():
            for number in numbers:
                path = self.settings.folder / name / str(number)
                try:
                    found.setdefault(name, {})[number] = load_version(path)
                except RepositoryError as exc:
                    raise VaeError(
                        f"{name}/{number}, which the other workers serve (decided at start, "
                        f"--poll-s off), no longer verifies, so this worker cannot serve what they "
                        f"do: {exc}. Restore the version's files, or restart the service to serve "
                        "what the repository holds now"
                    ) from None
        return found

    def _default_model(self, models: dict) -> str | None:
        """The model requests naming none go to, decided once at start so that a model added
        later never changes it: --model, else --default-model, else the only model. With several
        and none chosen there is none: such requests are refused, naming the models."""
        chosen = self.settings.model or self.settings.default_model
        if chosen:
            if chosen not in models:
                raise VaeError(
                    f"--default-model {chosen}: no such servable model in {self.settings.folder} "
                    f"(found: {', '.join(sorted(models))})"
                )
            return chosen
        if len(models) == 1:
            return next(iter(models))
        log.warning(
            "serving %d models (%s) and no --default-model: requests must name their model",
            len(models),
            ", ".join(sorted(models)),
        )
        return None

    def warm_up(self) -> None:
        """Every loaded version, once, before the server reports SERVING."""
        for model in self.registry.all():
            model.warm_up()

    def following(self) -> bool:
        """Whether the served versions follow anything: the folder (--poll-s), or the other
        workers' hand-made changes."""
        return bool(self.settings.poll_s) or self.shared_unloads is not None

    # -- following the folder ------------------------------------------------------------------
    async def run(self) -> None:
        """Poll the folder every --poll-s (if set) and the workers' shared unloads every second
        (if there are any); never returns."""
        loops = []
        if self.settings.poll_s:
            loops.append(self._every(self.settings.poll_s, self.poll))
        if self.shared_unloads is not None:
            loops.append(self._every(SHARED_UNLOADS_POLL_S, self.follow_shared_unloads))
        await asyncio.gather(*loops)

    async def _every(self, seconds: float, step) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except Exception:  # a poll must never take the server down
                log.exception("repository poll failed; serving what was loaded")

    async def poll(self) -> None:
        """One pass: load what is new, retire what is gone, follow the labels."""
        try:
            found = await asyncio.get_running_loop().run_in_executor(self.executor, self._scan)
        except RepositoryError as exc:
            self._once("scan", str(exc), "cannot read the repository, serving what was loaded: %s", exc)
            return
        self.reported.pop("scan", None)
        self.registry.evicted &= set(found)  # a model gone from the repository is not loaded on demand
        for name, numbers in found.items():
            if name in self.registry.evicted:
                continue  # not resident: its versions are read when a call loads it
            new = name not in self.registry.models and self.residency.bounded
            if new and not self.residency.fits(self.resident_bytes(), self.model_bytes(name)):
                self.registry.evicted.add(name)
                log.info("new model %s: loaded on its first call (bounded residency)", name)
                continue
            for number in numbers or []:
                if number not in self.registry.models.get(name, {}):
                    await self._load(name, number)
                elif _signature(self.settings.folder / name / str(number)) != self.loaded_at[name, number]:
                    await self._reload(name, number)
        for name in list(self.registry.models):
            if found.get(name, []) is None:  # unreadable now: what was loaded stays
                continue
            self._retire_gone(name, set(found.get(name, [])))
            self._follow_labels(name)
            self._follow_traffic(name)

    def _names(self) -> list[str]:
        return [self.settings.model] if self.settings.model else model_names(self.settings.folder)

    def _scan(self) -> dict[str, list[int] | None]:
        """The versions wanted of each model; None for a model whose folder cannot be read."""
        found: dict[str, list[int] | None] = {}
        for name in self._names():
            if name in self.unloaded:
                continue
            try:
                found[name] = wanted_versions(self.settings, name)
                self.reported.pop(f"scan {name}", None)
            except RepositoryError as exc:
                self._once(f"scan {name}", str(exc), "cannot read %s, serving what was loaded: %s", name, exc)
                found[name] = None
        return found

    async def _load(self, name: str, number: int) -> None:
        path = self.settings.folder / name / str(number)
        signature = _signature(path)
        if self.refused.get(path) == signature:
            return
        served = await asyncio.get_running_loop().run_in_executor(self.executor, self._warm, name, number)
        if served is None:  # _load_one logged why
            self.refused[path] = signature
            self.metrics.repository_event("refused")
            return
        self.refused.pop(path, None)
        self._add(served, signature)

    async def _reload(self, name: str, number: int) -> None:
        """A loaded version whose files changed on disk: served from the new files if they
        verify, else retired, even as its model's only version: a worker (re)started now could
        not load it, and workers must not disagree on what a version is."""
        path = self.settings.folder / name / str(number)
        signature = _signature(path)
        served = await asyncio.get_running_loop().run_in_executor(self.executor, self._warm, name, number)
        if served is None:  # _load_one logged why
            self.refused[path] = signature
            self.loaded_at.pop((name, number), None)
            self.metrics.repository_event("refused")
            log.error("retiring %s/%d: its files changed on disk and no longer verify", name, number)
            self._retire(name, number)
            return
        log.info("%s/%d: its files changed on disk and verify; serving them", name, number)
        self._add(served, signature)

    def _warm(self, name: str, number: int) -> Served | None:
        served = self._load_one(name, number)
        if served is not None:
            served.warm_up()
        return served

    def _load_one(self, name: str, number: int, version: ModelVersion | None = None) -> Served | None:
        """``_open``, or None with a log line saying why not."""
        try:
            return self._open(name, number, version)
        except VaeError as exc:
            log.error("refusing %s: %s", self.settings.folder / name / str(number), exc)
            return None

    def _open(self, name: str, number: int, version: ModelVersion | None = None) -> Served:
        """A version loaded and verified (checksums, shapes), ready to warm up; VaeError if not.
        ``version``: already verified (find_servable), not read again."""
        served = self._opened(name, number, version)
        served.cache = self.cache
        served.cache_key = version_key(served.version)
        served.in_flight = self.metrics.in_flight_calls.labels(name)
        served.mirror = self.mirror
        return served

    def _opened(self, name: str, number: int, version: ModelVersion | None) -> Served:
        settings = self.settings
        path = settings.folder / name / str(number)
        version = version or load_version(path)
        if version.manifest.autoencoder is not None:
            served = ServedAutoencoder(version, settings, self.executor)
            record = version.manifest.autoencoder
            log.info(
                "loaded %s: %s, %d latent channels at 1/%d, tiles of %d pixels, variant %s on %s",
                path,
                record.diffusers_class,
                record.latent_channels,
                record.downscale,
                served.tiling.sample_tile,
                settings.variant,
                served.provider,
            )
            return served
        small = OnnxPair.load(version, settings.device, 1, settings.variant)
        # On CPU every run uses the one-thread session (large batches in parallel pieces).
        pair = small
        if small.provider != CPU:
            pair = OnnxPair.load(version, settings.device, 0, settings.variant)
        log.info(
            "loaded %s: D=%d, M=%d, variant %s on %s",
            path,
            version.input_size,
            version.latent_size,
            settings.variant,
            pair.provider,
        )
        return ServedModel(version, pair, small, settings, self.executor, self.observer)

    def _add(self, served: Served, signature: tuple) -> None:
        self.registry.add(served)
        self.loaded_at[(served.version.name, served.version.version)] = signature
        self.metrics.repository_event("loaded")
        self.metrics.models.set(len(self.registry.all()))
        name = served.version.name
        log.info("serving %s/%d (latest: %d)", name, served.version.version, max(self.registry.models[name]))

    def _retire(self, name: str, number: int) -> None:
        served = self.registry.retire(name, number)
        self.loaded_at.pop((name, number), None)
        # Once the last call holding it is done, its sessions go with it: say so when they do.
        weakref.finalize(served, log.info, "released %s/%d: its sessions are freed", name, number)
        del served
        self.metrics.repository_event("retired")
        self.metrics.models.set(len(self.registry.all()))
        log.info("retired %s/%d", name, number)

    def _retire_gone(self, name: str, wanted: set[int]) -> None:
        loaded = self.registry.models[name]
        labelled = set(self.registry.labels.get(name, {}).values())
        for number in sorted(set(loaded) - wanted):
            if len(loaded) == 1 or number in labelled:
                why = "it is the model's only loaded version" if len(loaded) == 1 else "a label points at it"
                message = "keeping %s/%d, gone from the repository: %s"
                self._once(f"keep {name}/{number}", why, message, name, number, why)
                continue
            self._retire(name, number)

    def _follow_labels(self, name: str) -> None:
        path = self.settings.folder / name / LABELS
        try:
            self.registry.set_labels(name, read_labels(path.parent))
        except RepositoryError as exc:
            if self._once(f"labels {name}", (_signature(path), str(exc)), "refusing %s: %s", path, exc):
                self.metrics.repository_event("refused")
            return
        self.reported.pop(f"labels {name}", None)

    def _follow_traffic(self, name: str) -> None:
        path = self.settings.folder / name / TRAFFIC
        try:
            split = read_traffic(path.parent)
        except RepositoryError as exc:
            if self._once(f"traffic {name}", (_signature(path), str(exc)), "refusing %s: %s", path, exc):
                self.metrics.repository_event("refused")
            return
        self.reported.pop(f"traffic {name}", None)
        if split != self.registry.traffic.get(name):
            self.registry.set_traffic(name, split)
            log.info("traffic of %s: %s", name, split.describe() if split else "none; the latest answers")

    def _once(self, key: str, state: object, message: str, *args: object) -> bool:
        """Log a refusal or a kept version once per state, not on every poll."""
        if self.reported.get(key) == state:
            return False
        self.reported[key] = state
        log.warning(message, *args)
        return True

    # -- by hand: OIP's model repository extension --------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every version in the repository: READY (served), UNLOADED (by an operator) or
        UNAVAILABLE (on disk, not served), with the reason; and every version served, a model's
        last one kept after its folder went included."""
        rows = []
        for name in sorted(set(self._names()) | set(self.registry.models)):
            loaded = self.registry.models.get(name, {})
            on_disk = set(version_numbers(self.settings.folder / name))
            for number in sorted(on_disk | set(loaded)):
                if number in loaded:
                    state, reason = "READY", "" if number in on_disk else "kept: its folder is gone"
                elif name in self.unloaded:
                    state, reason = "UNLOADED", "unloaded by an operator"
                elif name in self.registry.evicted:
                    state, reason = (
                        "UNLOADED",
                        "not resident: the next call naming it loads it",
                    )
                else:
                    state, reason = "UNAVAILABLE", self._why_not(name, number)
                if state == "READY" or not ready_only:
                    rows.append({"name": name, "version": str(number), "state": state, "reason": reason})
        return rows

    def overview(self) -> list[dict]:
        """Every model in the repository as a person would read it: its versions (each with its
        state and its manifest in brief), the labels in effect and which version is latest."""
        rows: dict[str, list[dict]] = {}
        for row in self.index():
            rows.setdefault(row["name"], []).append(row)
        return [self._model_overview(name, versions) for name, versions in rows.items()]

    def _model_overview(self, name: str, rows: list[dict]) -> dict:
        loaded = self.registry.models.get(name, {})
        versions = []
        for row in rows:
            number = int(row["version"])
            brief = self._brief(name, number, loaded.get(number))
            versions.append({"version": number, "state": row["state"], "reason": row["reason"], **brief})
        return {
            "name": name,
            "default": name == self.registry.default,
            "latest": max(loaded) if loaded else None,
            "labels": self.registry.labels.get(name, {}),
            "traffic": self.registry.routes(name),
            "versions": versions,
        }

    def _brief(self, name: str, number: int, served: Served | None) -> dict:
        """The manifest in brief: the loaded one's, or read from the folder (a version not
        served may still be read; one that cannot is said so)."""
        if served is not None:
            return {"manifest": served.version.manifest.brief()}
        try:
            return {"manifest": Manifest.read(self.settings.folder / name / str(number)).brief()}
        except (RepositoryError, OSError) as exc:
            return {"manifest": None, "manifest_error": str(exc)}

    def _why_not(self, name: str, number: int) -> str:
        if self.settings.folder / name / str(number) in self.refused:
            return "refused: it failed verification (see the server log)"
        return f"not asked for by --version {self.settings.version}"

    async def load_model(self, name: str) -> None:
        """Load every version --version asks for of ``name``; RepositoryError naming the first
        that fails (those loaded stay)."""
        if name not in self._names():
            raise ModelNotFoundError(f"model {name!r} is not in the repository; it has {self._names()}")
        wanted = wanted_versions(self.settings, name)
        if not wanted:
            raise ModelNotFoundError(f"model {name!r} has no version {self.settings.version} to load")
        self.unloaded.discard(name)
        self._share()
        loop = asyncio.get_running_loop()
        for number in wanted:
            if number in self.registry.models.get(name, {}):
                continue
            signature = _signature(self.settings.folder / name / str(number))
            try:
                served = await loop.run_in_executor(self.executor, self._opened_warm, name, number)
            except VaeError as exc:
                self.metrics.repository_event("refused")
                raise RepositoryError(f"{name}/{number}: {exc}") from None
            self._add(served, signature)
        self.registry.evicted.discard(name)  # loaded by hand: resident until evicted again
        self._follow_labels(name)
        self._follow_traffic(name)

    def _opened_warm(self, name: str, number: int) -> Served:
        served = self._open(name, number)
        served.warm_up()
        return served

    async def unload_model(self, name: str) -> None:
        """Retire every version of ``name``, and keep polls from loading it again."""
        if name not in self.registry.models and name not in self._names():
            raise ModelNotFoundError(f"model {name!r} is not in the repository; it has {self._names()}")
        self.unloaded.add(name)
        self.registry.evicted.discard(name)  # unloaded by hand: no call loads it again
        self._share()
        for number in sorted(self.registry.models.get(name, {})):
            self._retire(name, number)
        log.info("unloaded %s by request", name)

    def _share(self) -> None:
        if self.shared_unloads is not None:
            atomic_write_text(self.shared_unloads, json.dumps(sorted(self.unloaded)))

    async def follow_shared_unloads(self) -> None:
        """Another worker's hand-made change, read from the supervisor's shared folder."""
        try:
            unloaded = set(json.loads(self.shared_unloads.read_text()))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._once("shared unloads", str(exc), "ignoring %s: %s", self.shared_unloads, exc)
            return
        for name in sorted(unloaded - self.unloaded):
            await self.unload_model(name)
        for name in sorted(self.unloaded - unloaded):
            try:
                await self.load_model(name)
            except VaeError as exc:
                log.error("loading %s as another worker did: %s", name, exc)


def _signature(path: Path) -> tuple:
    """What changes when a version folder or a labels file is rewritten or renamed into place,
    made readable (chmod changes the change time, not the modification time), or when any file
    of a version is overwritten in place (same size, same name: only its own times change)."""
    try:
        stat = path.stat()
        files = sorted(os.scandir(path), key=lambda e: e.name) if path.is_dir() else []
        inner = tuple((f.name, *_stat_key(f.stat(follow_symlinks=False))) for f in files)
    except OSError:
        return ()
    return (*_stat_key(stat), *inner)


def _stat_key(stat: os.stat_result) -> tuple:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(frozen=True)
class ServedSet:
    """The versions the supervisor of --workers found servable at start, by model: written to
    the folder it shares with its workers, read by every worker it (re)starts (without --poll-s;
    with it, every worker follows the repository and all reach the same set within a poll)."""

    versions: dict[str, tuple[int, ...]]

    def write(self, folder: Path) -> None:
        versions = {name: list(numbers) for name, numbers in sorted(self.versions.items())}
        atomic_write_text(folder / SERVED, json.dumps({"versions": versions}))

    @classmethod
    def read(cls, folder: Path) -> ServedSet | None:
        try:
            raw = json.loads((folder / SERVED).read_text())
        except FileNotFoundError:
            return None
        return cls({name: tuple(int(n) for n in numbers) for name, numbers in raw["versions"].items()})

    @classmethod
    def of(cls, found: dict[str, dict[int, ModelVersion]]) -> ServedSet:
        return cls({name: tuple(sorted(versions)) for name, versions in found.items()})


def wanted_versions(settings: ServeSettings, name: str) -> list[int]:
    """The versions of a model in the repository that --version asks to serve."""
    numbers = version_numbers(settings.folder / name)
    if settings.version == "all":
        return numbers
    if settings.version == "latest":
        return numbers[-1:]
    return [int(settings.version)] if int(settings.version) in numbers else []


def find_servable(settings: ServeSettings, log_refusals: bool = False) -> dict[str, dict[int, ModelVersion]]:
    """The versions vae serve would load, verified (manifest, sizes, checksums) but not opened;
    where there is none, a RepositoryError that says why, each reason once (the supervisor
    checks before its workers start, so a bad --model is one message, not one per worker).
    ``log_refusals``: log why each version left out was, when others are servable."""
    names = [settings.model] if settings.model else model_names(settings.folder)
    found: dict[str, dict[int, ModelVersion]] = {}
    reasons = []
    for name in names:
        wanted = wanted_versions(settings, name)
        if not wanted:
            reasons.append(_no_version(settings, name))
        for number in wanted:
            try:
                found.setdefault(name, {})[number] = load_version(settings.folder / name / str(number))
            except RepositoryError as exc:
                reasons.append(str(exc))
    if not found:
        why = "; ".join(reasons) or "it holds no model versions (NAME/VERSION folders that vae export writes)"
        if version_numbers(settings.folder):  # its folders are numbers: versions of one model
            folder = settings.folder
            why = (
                f"{folder} looks like one model, its folders versions {version_numbers(folder)}; the "
                f"repository is the folder above it: --repo {folder.parent} --model {folder.name}"
            )
        raise RepositoryError(f"no servable model in {settings.folder}: {why}")
    chosen = settings.default_model
    if chosen and not settings.model and chosen not in found:
        raise RepositoryError(
            f"--default-model {chosen}: no such servable model in {settings.folder} "
            f"(found: {', '.join(sorted(found))})"
        )
    for reason in reasons if log_refusals else []:
        log.error("refusing %s", reason)
    return found


def _no_version(settings: ServeSettings, name: str) -> str:
    numbers = version_numbers(settings.folder / name)
    if not numbers:
        return f"no model {name!r} (models there: {', '.join(model_names(settings.folder)) or 'none'})"
    return f"model {name!r} has no version {settings.version} (has {numbers})"


def _graph_bytes(manifest: Manifest) -> int:
    """The bytes of a version's graph files (its fp32 graphs: what a server loads by default)."""
    return sum(record.size for record in manifest.graphs.values())
