"""The model repository's layout: the one owner of the rules the export, the server and recalibration follow.

    <repository>/<name>/config.json         the ensemble's serving settings (`artefact.config`), optional
    <repository>/<name>/<version>/          a published version: manifest.json and the files it names
    <repository>/<name>/.<kind>-...         hidden work in progress and what it leaves behind

A name is a folder name (letters, digits, `_ . -`, never a path); a version is a positive integer
in its one spelling ("3", not "03" or "³"). A version is written aside under a hidden staging name
and published by one rename, so a reader sees all of it or none; replacing a version moves the old
one aside first (`.retired-`), and a published version the server refuses is withdrawn under a
hidden name (`.refused-`) so that it is not tried again and its number is reused.

A process killed mid-way leaves hidden folders: `tidy` (run by the server at start) removes
staging folders old enough that no export or recalibration can still be writing them, restores a
version whose replacement was interrupted between its two renames, and ages out withdrawn
versions, which are kept a while for whoever looks into why they were refused.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from artefact.manifest import MANIFEST_FILE

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""An ensemble's name: a folder name (never a path), short enough for every file system."""
VERSION = re.compile(r"[1-9][0-9]{0,8}")
"""A version folder's name, and a request's version: a positive integer in its one spelling."""

STAGING, RECALIBRATING, RETIRED, REFUSED = "staging", "recalibrating", "retired", "refused"
"""The kinds of hidden folder: an export being written, a recalibrated version being written, a version moved aside
while its replacement is renamed in, a published version the server refused."""
HIDDEN = re.compile(rf"\.({STAGING}|{RECALIBRATING}|{RETIRED}|{REFUSED})-([1-9][0-9]{{0,8}})?-?([0-9a-f]+)")
STALE_SECONDS = 6 * 3600.0
"""A staging folder untouched this long belongs to no live export or recalibration (each writes its files within
minutes); a shorter age could delete one still being written on a shared volume."""
KEEP_REFUSED_SECONDS = 7 * 86_400.0
"""How long a withdrawn version is kept for inspection."""


def version_of(text: str) -> int | None:
    """`text` as a version number, or None where it is not one (a request's version, a folder's name)."""
    return int(text) if VERSION.fullmatch(text) else None


def version_folders(folder: Path) -> list[int]:
    """Every version-named folder in an ensemble's folder, published or not, ascending (none where it is absent)."""
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(number for entry in entries if (number := version_of(entry.name)) is not None and entry.is_dir())


def published_versions(folder: Path) -> list[int]:
    """The versions of an ensemble's folder that hold a manifest, ascending."""
    return [version for version in version_folders(folder) if (folder / str(version) / MANIFEST_FILE).is_file()]


def next_version(folder: Path) -> int:
    """The number a new version of the ensemble in `folder` takes: one past every version folder there."""
    return max(version_folders(folder), default=0) + 1


def staging_folder(folder: Path, kind: str, version: int | None = None) -> Path:
    """A new, empty hidden folder in `folder` to write a version in before publishing it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{kind}-{'' if version is None else version}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def sync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_files(staging: Path) -> None:
    for path in staging.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    sync_directory(staging)


def publish(staging: Path, target: Path, replace: bool = False) -> None:
    """Make `staging` the version folder `target` by renames only (readers never see half of it), its files on
    disk first (after a power cut a published version is whole too). Without `replace` an existing `target` is
    never touched: `FileExistsError`, so another publisher's version is never overwritten."""
    _sync_files(staging)
    if target.exists() and replace:
        retired = target.with_name(f".{RETIRED}-{target.name}-{uuid.uuid4().hex[:12]}")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        try:
            staging.rename(target)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "the version exists already", str(target)) from error
            raise
    sync_directory(target.parent)


def withdraw(version_dir: Path) -> Path:
    """Move a published version that was refused out of the repository's sight (a hidden name beside it), so it is
    not tried again at every poll or restart and its number is reused; kept for a while for inspection."""
    hidden = version_dir.with_name(f".{REFUSED}-{version_dir.name}-{uuid.uuid4().hex[:8]}")
    version_dir.rename(hidden)
    return hidden


@dataclass
class Tidied:
    """What `tidy` did, and what it left for now."""

    removed: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.removed or self.restored or self.kept or self.failed)

    def summary(self) -> str:
        parts = [f"{label} {', '.join(paths[:10])}{' and more' if len(paths) > 10 else ''}"
                 for label, paths in (("removed", self.removed), ("restored", self.restored),
                                      ("kept for now", self.kept), ("could not tidy", self.failed)) if paths]
        return "; ".join(parts)


def _hidden_folders(root: Path) -> Iterator[tuple[Path, str, int | None]]:
    for ensemble in sorted(root.iterdir()) if root.is_dir() else []:
        if not ensemble.is_dir() or ensemble.name.startswith(".") or not NAME.fullmatch(ensemble.name):
            continue
        for entry in sorted(ensemble.iterdir()):
            match = HIDDEN.fullmatch(entry.name)
            if match is not None and entry.is_dir():
                yield entry, match.group(1), int(match.group(2)) if match.group(2) else None


def _age(path: Path, now: float) -> float:
    """Seconds since anything in `path` (one level down) last changed."""
    stamps = [path.stat().st_mtime]
    stamps += [entry.stat().st_mtime for entry in path.iterdir()]
    return now - max(stamps)


def tidy(root: Path, now: float | None = None, stale_seconds: float = STALE_SECONDS,
         keep_refused_seconds: float = KEEP_REFUSED_SECONDS) -> Tidied:
    """Clean what killed exports, recalibrations and replacements left in the repository `root` (see the module's
    docstring); nothing published is ever removed. Errors (a read-only volume) are listed, not raised."""
    now = time.time() if now is None else now
    done = Tidied()
    for path, kind, version in _hidden_folders(root):
        shown = f"{path.parent.name}/{path.name}"
        try:
            age = _age(path, now)
            if kind == RETIRED and version is not None and not (path.parent / str(version)).exists():
                path.rename(path.parent / str(version))  # killed between the two renames: the old one is all
                done.restored.append(f"{path.parent.name}/{version}")
            elif kind == RETIRED or (kind in (STAGING, RECALIBRATING) and age > stale_seconds) \
                    or (kind == REFUSED and age > keep_refused_seconds):
                shutil.rmtree(path)
                done.removed.append(shown)
            else:
                done.kept.append(shown)
        except OSError as error:
            done.failed.append(f"{shown} ({error.strerror or error})")
    return done
