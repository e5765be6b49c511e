"""A model repository on object storage, served from a verified local cache.

``s3://BUCKET/models`` has the layout of a folder repository (``NAME/VERSION/{files,
manifest.json}``, ``NAME/labels.json``). ``RepositoryMirror`` keeps a local copy of it under
``$VAESERVE_CACHE_DIR/objects/SCHEME/BUCKET/KEY``: a version is downloaded into a dotted
staging folder, verified against its manifest's sizes and SHA-256s, and only then renamed into
place, so the service (which serves the cache like any folder) never sees a partial or tampered
version. A version whose objects change (size or modification time) is downloaded again; one
that fails verification is refused once, logged, and tried again when its objects change.
Versions and labels removed from the store are removed from the cache. The cache survives
restarts: a version already there and unchanged is verified, not downloaded.

Uploads (``vae export --repo s3://...``) put the manifest last: a version without its manifest
is not a version, so a polling server never loads a half-uploaded one.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vaeserve.atomic import atomic_write_text, publish_mode
from vaeserve.download import default_cache_dir
from vaeserve.errors import RepositoryError, StorageError
from vaeserve.manifest import MANIFEST, Manifest
from vaeserve.repository import (
    LABELS,
    TRAFFIC,
    ModelVersion,
    TrafficSplit,
    labels_text,
    load_version,
    open_path,
    parse_labels,
    read_labels,
    read_traffic,
    version_numbers,
)
from vaeserve.storage import Location, ObjectInfo, ObjectPath, write_whole

log = logging.getLogger("vaeserve.repository")


def cache_folder(root: ObjectPath) -> Path:
    """Where the local copy of ``root`` lives: one folder per store path, shared by every
    process on this machine (serve, embed, Ray tasks)."""
    scheme, rest = root.uri.split("://", 1)
    return default_cache_dir() / "objects" / scheme / rest


def open_model(path: Location) -> ModelVersion:
    """``NAME/VERSION`` or ``NAME`` (its latest version), local or on object storage."""
    if isinstance(path, Path):
        return open_path(path)
    if path.name.isdecimal():
        root, name, number = path.parent.parent, path.parent.name, int(path.name)
    else:
        root, name, number = path.parent, path.name, None
    mirror = RepositoryMirror(root)
    versions = mirror.remote_versions(name)
    if not versions:
        raise RepositoryError(f"{root / name}: no versions of model {name!r} (no NAME/VERSION/{MANIFEST})")
    number = number or max(versions)
    if number not in versions:
        raise RepositoryError(f"{root / name}: no version {number}; versions there: {sorted(versions)}")
    return mirror.fetch(name, number, versions[number])


@dataclass
class RepositoryMirror:
    root: ObjectPath
    folder: Path | None = None
    # (name, version) → the stamp of a download that failed verification: not tried again until
    # the objects change.
    refused: dict[tuple[str, int], str] = field(default_factory=dict)
    checked: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.folder = self.folder or cache_folder(self.root)

    def remote_versions(self, name: str) -> dict[int, list[ObjectInfo]]:
        """The complete versions of one model: number → its objects."""
        return self._listing(self.root / name).get(name, {})

    def sync(self) -> None:
        """Make the cache what the store holds now; a store that cannot be listed changes nothing."""
        listing = self._listing(self.root)
        for name, versions in listing.items():
            for number, objects in versions.items():
                try:
                    self.fetch(name, number, objects)
                except RepositoryError as exc:
                    self._refuse(name, number, objects, exc)
            for what in (LABELS, TRAFFIC):
                self._sync_file(name, what)
        self._remove_gone(listing)

    def fetch(self, name: str, number: int, objects: list[ObjectInfo]) -> ModelVersion:
        """The verified local copy of one version, downloaded unless the cache has it already."""
        target = self.folder / name / str(number)
        stamp = _stamp(objects)
        stamp_file = self.folder / name / f".{number}.stamp"
        if target.is_dir() and _read(stamp_file) == stamp:
            if (name, number) in self.checked:
                return ModelVersion(name, number, target, Manifest.read(target))
            try:
                version = load_version(target)
                self.checked.add((name, number))
                return version
            except RepositoryError as exc:
                log.warning("cached %s failed verification (%s); downloading it again", target, exc)
        if self.refused.get((name, number)) == stamp:
            raise RepositoryError(f"{self.root / name / str(number)}: refused before, unchanged since")
        version = self._download(name, number, objects, target)
        atomic_write_text(stamp_file, stamp)
        self.checked.add((name, number))
        log.info("fetched %s/%s/%d into %s", self.root, name, number, target)
        return version

    def _download(self, name: str, number: int, objects: list[ObjectInfo], target: Path) -> ModelVersion:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{number}.download-", dir=target.parent))
        try:
            prefix = f"{self.root / name / str(number)}/"
            for info in objects:
                relative = info.path.uri.removeprefix(prefix)
                info.path.download(staging / relative)
            version = load_version(staging)  # every file's size and SHA-256 against the manifest
            if (version.name, version.version) != (name, number):
                raise RepositoryError(
                    f"{self.root / name / str(number)}: its manifest is {version.name}/{version.version}"
                )
            publish_mode(staging)
            _swap_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return load_version(target)

    def _refuse(self, name: str, number: int, objects: list[ObjectInfo], exc: Exception) -> None:
        stamp = _stamp(objects)
        if self.refused.get((name, number)) != stamp:
            self.refused[(name, number)] = stamp
            log.error("refusing %s/%s/%d: %s", self.root, name, number, exc)

    def _sync_file(self, name: str, what: str) -> None:
        """A model's labels or traffic split, as the store has it now (or gone with it)."""
        remote, local = self.root / name / what, self.folder / name / what
        try:
            text = remote.read_text() if remote.exists() else None
        except StorageError as exc:
            log.warning("cannot read %s: %s", remote, exc)
            return
        if text is None:
            local.unlink(missing_ok=True)
        elif _read(local) != text:
            atomic_write_text(local, text)
            log.info("%s of %s updated from %s", what, name, remote)

    def _remove_gone(self, listing: dict[str, dict[int, list[ObjectInfo]]]) -> None:
        if not self.folder.is_dir():
            return
        for model in self.folder.iterdir():
            if not model.is_dir() or model.name.startswith("."):
                continue
            kept = listing.get(model.name, {})
            for version in model.iterdir():
                if version.name.isdecimal() and int(version.name) not in kept:
                    _remove_whole(version)
                    (model / f".{version.name}.stamp").unlink(missing_ok=True)
                    log.info(
                        "%s/%s/%s is gone from the store; removed from the cache",
                        self.root,
                        model.name,
                        version.name,
                    )

    def _listing(self, under: ObjectPath) -> dict[str, dict[int, list[ObjectInfo]]]:
        """name → version → objects, for the versions whose manifest is there."""
        found: dict[str, dict[int, list[ObjectInfo]]] = {}
        prefix = f"{self.root}/"
        for info in under.files():
            parts = info.path.uri.removeprefix(prefix).split("/")
            if len(parts) >= 3 and parts[1].isdecimal() and int(parts[1]) > 0:
                found.setdefault(parts[0], {}).setdefault(int(parts[1]), []).append(info)
        return {
            name: {n: objs for n, objs in versions.items() if any(o.path.name == MANIFEST for o in objs)}
            for name, versions in found.items()
        }


def model_versions(repo: Location, name: str) -> list[int]:
    """The complete versions of a model in a folder or a store, ascending."""
    if isinstance(repo, Path):
        return version_numbers(repo / name)
    return sorted(RepositoryMirror(repo).remote_versions(name))


# Beside a model's labels file: held while one update reads and writes it.
LABELS_LOCK = ".labels.lock"


def model_labels(repo: Location, name: str) -> dict[str, int]:
    """A model's labels, from a folder or a store ({} without a labels file)."""
    if isinstance(repo, Path):
        return read_labels(repo / name)
    stored = repo / name / LABELS
    return parse_labels(stored.read_text(), str(stored)) if stored.exists() else {}


def update_model_labels(
    repo: Location, name: str, change: Callable[[dict[str, int]], dict[str, int]]
) -> dict[str, int]:
    """Read a model's labels, ``change`` them and write the result, with no other update between
    (in a folder, under an exclusive lock on ``NAME/.labels.lock``: two `vae label` at once both
    take effect). On a store the read and the write are two requests, and the last writer wins."""
    if not isinstance(repo, Path):
        labels = change(model_labels(repo, name))
        set_model_labels(repo, name, labels)
        return labels
    with open(repo / name / LABELS_LOCK, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process ends
        before = model_labels(repo, name)
        labels = change(dict(before))
        if labels != before:
            set_model_labels(repo, name, labels)
        return labels


def set_model_labels(repo: Location, name: str, labels: dict[str, int]) -> None:
    """Written whole: renamed into place in a folder, one upload to a store; a polling server
    reads the old labels or the new."""
    write_whole(repo / name / LABELS, labels_text(labels).encode())


def model_traffic(repo: Location, name: str) -> TrafficSplit | None:
    """A model's traffic split, from a folder or a store (None without one)."""
    if isinstance(repo, Path):
        return read_traffic(repo / name)
    stored = repo / name / TRAFFIC
    return TrafficSplit.parse(stored.read_text(), str(stored)) if stored.exists() else None


def set_model_traffic(repo: Location, name: str, split: TrafficSplit | None) -> None:
    """Written whole as labels are (None: removed, so calls naming no version go to the latest)."""
    if split is not None:
        write_whole(repo / name / TRAFFIC, split.text().encode())
    else:
        (repo / name / TRAFFIC).unlink(missing_ok=True)


def upload_version(version: ModelVersion, root: ObjectPath) -> ObjectPath:
    """A local version's files under ``root/NAME/VERSION``, the manifest last."""
    target = root / version.name / str(version.version)
    files = sorted(p for p in version.path.rglob("*") if p.is_file() and p.name != MANIFEST)
    for path in files:
        (target / path.relative_to(version.path).as_posix()).upload(path)
    (target / MANIFEST).upload(version.path / MANIFEST)
    return target


def remove_version(target: ObjectPath) -> None:
    """A version's objects under ``target``, the manifest first: a server polling the store sees
    the version go in one step, never a manifest whose files are half deleted (the mirror of
    `upload_version`'s manifest last)."""
    (target / MANIFEST).unlink(missing_ok=True)
    target.remove_tree()


def _stamp(objects: list[ObjectInfo]) -> str:
    text = "\n".join(f"{o.path.uri}:{o.stamp()}" for o in sorted(objects, key=lambda o: o.path.uri))
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _moved_aside(folder: Path, why: str) -> Path | None:
    """``folder`` renamed to a hidden name beside it (a hidden name is no version to a worker's
    scan), where it can be deleted out of sight; None when there is no such folder."""
    aside = folder.with_name(f".{folder.name}.{why}-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return None
    return aside


def _remove_whole(version: Path) -> None:
    """Moved aside before it is deleted, so a worker's scan never finds the folder half gone:
    its manifest deleted, its graphs still there."""
    aside = _moved_aside(version, "gone")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an older copy there is moved aside first and removed."""
    old = _moved_aside(target, "old")
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # another process placed it first: theirs is as good
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
