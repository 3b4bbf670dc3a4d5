"""Which kernel config a GEMM launch uses: tuned once per key, bucketed in M, persisted on disk.

    key = (op, device, triton version, m_bucket(M), N, K, weight layout, out dtype, residual dtype,
           activation, bias)
    m_bucket(M) = max(16, next_pow2(M))

The key holds what changes the fastest config: the weight's layout (K-major or not: a different
memory access pattern, a different binary) and the epilogue as well as the sizes. ``M`` enters
only through its bucket, so the M of a compacted early-exit batch lands on a bucket tuned before
(ViT-B/32: batches 1..256 give 9 buckets). On a miss the candidates are timed once
(``triton.testing.do_bench``) and the winner is stored in memory and in a JSON file, so a process
that starts later does not tune again:

    $LRA_TRITON_TUNE_CACHE   the file; "" keeps the results in memory only
    default                  $XDG_CACHE_HOME (or ~/.cache)/lra_kernels/gemm-tune.json

Where no timing may run (``may_tune=False``: autotuning off, the interpreter, a CUDA graph being
captured) a miss takes the config of the nearest tuned bucket with the same other fields, else the
caller's default: a launch never waits on a benchmark there.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

from ._launch import next_pow2

ENV_PATH = "LRA_TRITON_TUNE_CACHE"
FORMAT = 1


def m_bucket(M: int) -> int:
    return max(16, next_pow2(M))


def default_path() -> Path | None:
    env = os.environ.get(ENV_PATH)
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lra_kernels" / "gemm-tune.json"


def key_string(fields: dict) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


class TuneCache:
    """Tuned configs by key (a dict of JSON scalars, ``m_bucket`` among them), mirrored to ``path``.

    ``events`` lists every tuning run of this process: ``(key fields, seconds, candidates timed)``.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.events: list[tuple[dict, float, int]] = []
        self._entries: dict[str, dict] | None = None
        self._lock = threading.Lock()

    def _read_file(self) -> dict[str, dict]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache is only a cache: tune again
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    def entries(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries

    def get(self, fields: dict) -> dict | None:
        return self.entries().get(key_string(fields))

    def nearest(self, fields: dict) -> dict | None:
        """The config of the tuned bucket nearest in log2(M) among keys equal in every other field."""
        rest = {k: v for k, v in fields.items() if k != "m_bucket"}
        best, best_d = None, math.inf
        for key, cfg in self.entries().items():
            other = json.loads(key)
            if {k: v for k, v in other.items() if k != "m_bucket"} != rest or "m_bucket" not in other:
                continue
            d = abs(math.log2(other["m_bucket"]) - math.log2(fields["m_bucket"]))
            if d < best_d or (d == best_d and other["m_bucket"] > best["m_bucket"]):  # ties: the larger tile
                best, best_d = {**cfg, "m_bucket": other["m_bucket"]}, d
        if best is None:
            return None
        best.pop("m_bucket")
        return best

    def put(self, fields: dict, config: dict) -> None:
        key = key_string(fields)
        with self._lock:
            self.entries()[key] = dict(config)
            if self.path is None:
                return
            merged = {**self._read_file(), key: dict(config)}  # other processes may have added keys
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "entries": merged}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
            self._entries = merged


_CACHES: dict[Path | None, TuneCache] = {}


def tune_cache(path: Path | None | str = "default") -> TuneCache:
    """The process's cache for ``path`` (default: ``default_path()``, read when called)."""
    path = default_path() if path == "default" else (Path(path) if path is not None else None)
    if path not in _CACHES:
        _CACHES[path] = TuneCache(path)
    return _CACHES[path]


def choose(cache: TuneCache, fields: dict, candidates: list[dict], bench: Callable[[dict], float],
           may_tune: bool, default: dict) -> tuple[dict, str]:
    """``(config, how)``; ``how`` is ``"cached"``, ``"tuned"``, ``"nearest"`` or ``"default"``.

    ``bench(config)`` returns milliseconds; a candidate that raises (does not compile, does not fit)
    is skipped. When every candidate fails, ``default`` is used and nothing is stored.
    """
    hit = cache.get(fields)
    if hit is not None:
        return hit, "cached"
    if not may_tune or not candidates:
        near = cache.nearest(fields)
        return (near, "nearest") if near is not None else (default, "default")
    t0 = time.perf_counter()
    timed = []
    for cfg in candidates:
        try:
            timed.append((float(bench(cfg)), cfg))
        except Exception:  # noqa: BLE001 - out of resources, compile error: not a candidate here
            continue
    if not timed:
        return default, "default"
    best = min(timed, key=lambda tc: tc[0])[1]
    cache.put(fields, best)
    cache.events.append((dict(fields), time.perf_counter() - t0, len(timed)))
    return best, "tuned"
