"""Throughput of the checksum candidates for checkpoint manifests, on this CPU, in one run.

Each candidate hashes the same file in 16 MiB chunks (``readinto`` a reused buffer; the file is read once first so
every candidate reads from the page cache: the cost measured is the hash, which is what a checkpoint just written or
already verified pays), round-robin for ``--repeats`` rounds; the median is reported. ``hashlib.file_digest`` is
timed too. xxhash is shown when installed, for reference only (cap_ds uses the standard library).

    python benchmarks/bench_checksum.py --size-mib 1024 --repeats 3
    python benchmarks/bench_checksum.py --file /path/to/mp_rank_00_model_states.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

CHUNK = 16 << 20


def _chunked(update_factory: Callable[[], tuple[Callable[[memoryview], None], Callable[[], str]]]):
    def run(path: Path) -> str:
        update, digest = update_factory()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                update(view[:n])
        return digest()
    return run


def _hashlib(name: str):
    def factory():
        h = hashlib.new(name)
        return h.update, h.hexdigest
    return factory


def _crc32():
    state = [0]

    def update(view: memoryview) -> None:
        state[0] = zlib.crc32(view, state[0])

    return update, lambda: f"{state[0]:08x}"


def candidates() -> dict[str, Callable[[Path], str]]:
    out = {f"{name} (16 MiB chunks)": _chunked(_hashlib(name)) for name in ("blake2b", "sha256", "sha1", "md5")}
    out["zlib.crc32 (16 MiB chunks)"] = _chunked(_crc32)
    if hasattr(hashlib, "file_digest"):
        for name in ("blake2b", "sha256"):
            def run(path: Path, name: str = name) -> str:
                with open(path, "rb") as f:
                    return hashlib.file_digest(f, name).hexdigest()
            out[f"hashlib.file_digest({name})"] = run
    try:
        import xxhash

        for name in ("xxh3_64", "xxh3_128"):
            def factory(name: str = name):
                h = getattr(xxhash, name)()
                return h.update, h.hexdigest
            out[f"xxhash.{name} (reference; not a dependency)"] = _chunked(factory)
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, help="hash this file (default: a random file of --size-mib)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    tmp = None
    path = args.file
    if path is None:
        tmp = tempfile.NamedTemporaryFile(prefix="bench_checksum.", suffix=".bin", delete=False)
        block = os.urandom(CHUNK)
        for _ in range(max(1, args.size_mib // 16)):
            tmp.write(block[:-1] + os.urandom(1))
        tmp.close()
        path = Path(tmp.name)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:  # warm the page cache
            while f.read(CHUNK):
                pass
        cands = candidates()
        times: dict[str, list[float]] = {name: [] for name in cands}
        for _ in range(args.repeats):
            for name, fn in cands.items():
                t0 = time.perf_counter()
                fn(path)
                times[name].append(time.perf_counter() - t0)
        rows = {name: {"median_s": statistics.median(ts), "gb_per_s": size / statistics.median(ts) / 1e9}
                for name, ts in times.items()}
        print(f"file {path} ({size / 2**30:.2f} GiB), {args.repeats} rounds, python {sys.version.split()[0]}, "
              f"zlib {zlib.ZLIB_RUNTIME_VERSION}")
        for name, row in sorted(rows.items(), key=lambda kv: kv[1]["median_s"]):
            print(f"  {name:48s} {row['median_s']:7.3f} s   {row['gb_per_s']:6.2f} GB/s")
        if args.json is not None:
            args.json.write_text(json.dumps({"file_bytes": size, "results": rows}, indent=2) + "\n")
    finally:
        if tmp is not None:
            os.unlink(tmp.name)


if __name__ == "__main__":
    main()
