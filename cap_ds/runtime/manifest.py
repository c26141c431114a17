"""Checksummed file manifests: what makes a checkpoint or an export verifiable, not just present at the right sizes.

A manifest maps each file of a folder (relative path) to its size and to a checksum ``"crc32:<8 hex>"``. The
checksum is for corruption (a disk, a copy or a transfer that changed bytes without changing the size), not for
security: CRC-32 (``zlib.crc32``, 16 MiB chunks) was the fastest robust candidate of the standard library on the
project's CPU (``benchmarks/bench_checksum.py``: 1.7 GB/s, sha256 1.0 GB/s, blake2b 0.44 GB/s), and it catches
every burst error up to 32 bits and any other change with probability 1 - 2**-32. The algorithm is part of each
value, so a later cap_ds may change it and still read old manifests.

Hashing a large file is seconds, so each process hashes a file at most once while it is unchanged: digests are
cached by (device, inode, size, mtime); a file written and hashed by this process, or verified once, is not read
again by a later verification in the same process.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cap_ds.runtime.atomic import write_json

ALGORITHM = "crc32"
CHUNK = 16 << 20  # 16 MiB: large reads, a small resident buffer
EXPORT_MANIFEST = "files.json"  # in an exported folder (``final/``)

_cache: dict[tuple[int, int, int, int, str], str] = {}


def _signature(st: os.stat_result, algorithm: str) -> tuple[int, int, int, int, str]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, algorithm


def _compute(path: Path, algorithm: str) -> str:
    if algorithm != "crc32":
        raise ValueError(f"unknown checksum algorithm {algorithm!r} (this cap_ds knows crc32)")
    crc = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"crc32:{crc:08x}"


def file_checksum(path: str | os.PathLike, algorithm: str = ALGORITHM, cached: bool = True) -> str:
    """``"<algorithm>:<hex>"`` of the file's bytes; with ``cached``, reused while the file is unchanged (same inode,
    size and mtime), so one process reads a large checkpoint file once however often it is verified."""
    path = Path(path)
    if not cached:
        return _compute(path, algorithm)
    key = _signature(path.stat(), algorithm)
    digest = _cache.get(key)
    if digest is None:
        digest = _compute(path, algorithm)
        _cache[key] = digest
    return digest


def remember(path: str | os.PathLike, checksum: str) -> None:
    """Record ``checksum`` as the digest of ``path`` as it is now (one computed by another rank that wrote it), so
    this process does not read the file to verify it again."""
    algorithm = checksum.split(":", 1)[0]
    _cache[_signature(Path(path).stat(), algorithm)] = checksum


def clear_cache() -> None:
    """Forget every cached digest (tests that change a file within the filesystem's mtime resolution)."""
    _cache.clear()


def algorithm_of(checksum: str) -> str:
    return checksum.split(":", 1)[0] if ":" in checksum else ""


def folder_files(folder: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Relative paths of the files under ``folder`` a manifest covers: all but hidden ones (temporaries of atomic
    writes) and ``exclude``, sorted."""
    folder = Path(folder)
    skip = set(exclude)
    return [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip and not any(part.startswith(".") for part in
                                                                p.relative_to(folder).parts)]


def describe_files(folder: str | os.PathLike, names: Iterable[str],
                   known: Mapping[str, str] | None = None) -> tuple[dict[str, int], dict[str, str]]:
    """``(sizes, checksums)`` of ``names`` (relative to ``folder``); a checksum in ``known`` (computed by the rank
    that wrote the file) is taken as is, the others are computed here."""
    folder = Path(folder)
    known = known or {}
    sizes, sums = {}, {}
    for rel in names:
        path = folder / rel
        sizes[rel] = path.stat().st_size
        if rel in known:
            sums[rel] = known[rel]
            remember(path, known[rel])
        else:
            sums[rel] = file_checksum(path)
    return sizes, sums


def file_problems(folder: str | os.PathLike, sizes: Mapping[str, int], checksums: Mapping[str, str] | None,
                  cached: bool = True) -> list[tuple[str, str]]:
    """``(kind, text)`` for each problem of ``folder`` against a manifest, the text naming the file; kind is
    ``missing``, ``size`` (all sizes are checked first: cheap, and a truncated file is not read), then ``checksum``
    (bytes changed at the same size) or ``unreadable``. ``checksums`` None (a legacy manifest): sizes only."""
    folder = Path(folder)
    problems = []
    for rel, size in sorted(sizes.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(("missing", f"{path} is missing"))
            continue
        actual = path.stat().st_size
        if actual != size:
            problems.append(("size", f"{path} is truncated or changed ({actual} bytes, {size} written)"))
    if problems or checksums is None:
        return problems
    for rel in sorted(sizes):
        path = folder / rel
        expected = checksums.get(rel)
        if not isinstance(expected, str):
            problems.append(("checksum", f"{path} has no checksum in the manifest (was the manifest edited?)"))
            continue
        try:
            actual = file_checksum(path, algorithm_of(expected), cached=cached)
        except ValueError as err:
            problems.append(("checksum", f"{path}: {err}"))
            continue
        except OSError as err:
            problems.append(("unreadable", f"{path} could not be read ({err.strerror or err})"))
            continue
        if actual != expected:
            problems.append(("checksum", f"{path} checksum differs from the one recorded when it was written "
                                         f"({actual}, {expected} recorded): its bytes changed"))
    return problems


def check_files(folder: str | os.PathLike, sizes: Mapping[str, int], checksums: Mapping[str, str] | None,
                cached: bool = True) -> list[str]:
    """The texts of :func:`file_problems`, each naming the file ([] when the folder matches its manifest)."""
    return [text for _, text in file_problems(folder, sizes, checksums, cached)]


# ------------------------------------------------------------------------------------------------ exported folders
def write_folder_manifest(folder: str | os.PathLike, name: str = EXPORT_MANIFEST,
                          extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``<folder>/<name>`` (atomically, and last: call it when every other file is complete) with the size and
    checksum of every other file of ``folder``."""
    folder = Path(folder)
    sizes, sums = describe_files(folder, folder_files(folder, exclude=(name,)))
    write_json(folder / name, {**(extra or {}), "algorithm": ALGORITHM, "files": sizes, "checksums": sums})
    return folder / name


def verify_folder(path: str | os.PathLike, name: str = EXPORT_MANIFEST) -> list[str]:
    """Problems of a folder written with a manifest (an exported ``final/``), each naming the file; [] when every
    file is there with its recorded size and checksum. Always reads every file (no cached digest). Files added
    after the export are reported too, as not in the manifest."""
    folder = Path(path)
    manifest = folder / name
    try:
        data = json.loads(manifest.read_text())
        sizes, sums = data["files"], data["checksums"]
        if not isinstance(sizes, dict) or not isinstance(sums, dict):
            raise TypeError("files/checksums are not objects")
    except FileNotFoundError:
        return [f"{manifest} is missing (not an export of this cap_ds, or its writing was interrupted)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{manifest} is unreadable ({err})"]
    problems = check_files(folder, sizes, sums, cached=False)
    extra = sorted(set(folder_files(folder, exclude=(name,))) - set(sizes))
    problems += [f"{folder / rel} is not in {name} (added after the export?)" for rel in extra]
    return problems


__all__ = ["ALGORITHM", "EXPORT_MANIFEST", "check_files", "clear_cache", "describe_files", "file_checksum",
           "file_problems", "folder_files", "remember", "verify_folder", "write_folder_manifest"]
