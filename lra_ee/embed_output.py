"""The output of ``lra-ee embed``: Parquet shards, a manifest, resume and the one-row-per-input check.

    OUT/part-<write uuid>-<task>-<i>.parquet    rows: path, embedding (list<float32>), exit_layer, error
    OUT/_lra_ee_embed.json                      the job (model fingerprint, depth mode) and its runs

Parquet readers skip names starting with ``_``, so ``pyarrow.dataset.dataset(OUT)`` and
``pandas.read_parquet(OUT)`` read the rows only. A shard is either whole or unreadable (Parquet
writes its footer last): ``--resume`` removes unreadable shards left by an interrupted run, keeps
every row of the whole ones and embeds only the inputs that have no row yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .embed_inputs import EmbedError

MANIFEST = "_lra_ee_embed.json"
SHARD_PREFIX = "part-"
FORMAT_VERSION = 1
# The job must match for --resume: mixing embeddings of two models or two depth modes in one index is wrong.
JOB_KEYS = ("model_fingerprint", "early_exit", "normalized", "embedding_dim")


def output_schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("embedding", pa.list_(pa.float32())), ("exit_layer", pa.int64()),
                      ("error", pa.string())])


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the names and bytes of the model directory's files (config + weights)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for p in sorted(q for q in root.iterdir() if q.is_file()):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def shard_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob(f"{SHARD_PREFIX}*.parquet") if p.is_file())


def read_manifest(out: Path) -> dict | None:
    p = out / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise EmbedError(f"{p} is unreadable ({err}): choose another --out") from None


def write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)


@dataclass
class ShardScan:
    """The rows already in ``OUT``: how often each path occurs, and the shards that cannot be read."""

    counts: Counter = field(default_factory=Counter)
    whole: list[Path] = field(default_factory=list)
    broken: list[Path] = field(default_factory=list)
    errors: int = 0

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def duplicated(self) -> list[str]:
        return [p for p, n in self.counts.items() if n > 1]


def scan_shards(out: Path) -> ShardScan:
    import pyarrow.parquet as pq

    scan = ShardScan()
    for shard in shard_files(out):
        try:
            table = pq.read_table(shard, columns=["path", "error"])
        except Exception:  # a footer-less file from an interrupted write (ArrowInvalid, OSError, ...)
            scan.broken.append(shard)
            continue
        scan.whole.append(shard)
        scan.counts.update(table.column("path").to_pylist())
        scan.errors += table.num_rows - table.column("error").null_count
    return scan


def prepare_output(out: Path, job: dict, resume: bool) -> tuple[dict, set[str], list[str]]:
    """Check ``out`` and open a run in its manifest; ``(manifest, paths already done, notes)``.

    A new or empty folder starts fresh. A folder holding an earlier run is refused unless
    ``resume`` (then the job must match); any other non-empty folder is refused.
    """
    notes: list[str] = []
    if out.exists() and not out.is_dir():
        raise EmbedError(f"--out {out} is a file: pass a folder for the Parquet shards")
    manifest = read_manifest(out) if out.is_dir() else None
    occupied = out.is_dir() and any(out.iterdir())
    if manifest is None and occupied:
        raise EmbedError(f"--out {out} exists and is not an lra-ee embed output: choose another --out")
    done: set[str] = set()
    if manifest is not None:
        scan = scan_shards(out)
        if not resume:
            raise EmbedError(f"--out {out} already holds an embedding run ({scan.rows} rows in {len(scan.whole)} "
                             "shards): pass --resume to embed only the inputs it lacks, or choose another --out")
        old = manifest.get("job", {})
        for key in JOB_KEYS:
            if old.get(key) != job[key]:
                raise EmbedError(f"--resume: {out} was written with {key}={old.get(key)!r}, this run has "
                                 f"{key}={job[key]!r}; embeddings of both do not belong in one index: "
                                 "use another --out")
        if scan.duplicated:
            raise EmbedError(f"--resume: {out} holds {len(scan.duplicated)} path(s) more than once "
                             f"(e.g. {scan.duplicated[0]}); it was not written by one lra-ee embed job")
        for shard in scan.broken:
            shard.unlink()
        if scan.broken:
            notes.append(f"removed {len(scan.broken)} incomplete shard(s) left by an interrupted run")
        done = set(scan.counts)
        manifest["job"] = {**old, **job}
    else:
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT_VERSION, "job": dict(job), "runs": [], "complete": False}
    manifest["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kept_rows": len(done)})
    manifest["complete"] = False
    write_manifest(out, manifest)
    return manifest, done, notes


@dataclass(frozen=True)
class OutputCheck:
    rows: int
    errors: int
    shards: int
    missing: list[str]
    duplicated: list[str]
    stale: int  # rows of paths this listing no longer names (kept; they came from an earlier --data)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated


def check_output(out: Path, expected: list[str]) -> OutputCheck:
    """Every expected path has exactly one row in ``out``."""
    scan = scan_shards(out)
    wanted = set(expected)
    missing = [p for p in expected if scan.counts[p] == 0]
    stale = sum(n for p, n in scan.counts.items() if p not in wanted)
    return OutputCheck(scan.rows, scan.errors, len(scan.whole), missing, scan.duplicated, stale)


def finish_manifest(out: Path, manifest: dict, check: OutputCheck, embedded: int, seconds: float) -> None:
    manifest["runs"][-1].update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "embedded": embedded,
                                 "seconds": round(seconds, 3)})
    manifest.update({"complete": check.ok, "rows": check.rows, "error_rows": check.errors, "shards": check.shards})
    write_manifest(out, manifest)
