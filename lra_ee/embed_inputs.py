"""What ``lra-ee embed`` reads: a folder tree, a file list or webdataset-style tar shards.

Every input gets one stable id, its ``path`` in the output:

- an image file: its absolute path (``/data/imgs/a/0001.jpg``);
- an image inside a tar shard: ``<absolute shard path>::<member name>`` (``/data/shards/000042.tar::x7.jpg``).

The listing runs on the driver; the bytes are read by the decode tasks (``read_input``), so an
unreadable file becomes an error row there instead of stopping the run. A shard's headers are
read on the driver to find its image members (their byte ranges); a shard that cannot be listed
(truncated, not a tar, unreadable) becomes one error row under the shard's own path, after the
members that could be listed.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .data import IMAGE_EXTENSIONS
from .errors import UserError

MEMBER_SEP = "::"
SHARD_SUFFIX = ".tar"
MAX_INPUT_BYTES = 256 * 1024 * 1024  # a larger "image" is an error row, not an out-of-memory decode task
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class EmbedError(UserError, ValueError):
    """A problem with the arguments of ``lra-ee embed`` the user can fix (one line, exit code 2)."""


@dataclass
class InputListing:
    """The inputs, one entry per image, in listing order; ``path`` values are unique.

    ``file``/``offset``/``size``: where the bytes are (``offset`` -1: the whole file).
    ``error``: set for an input already known to be unreadable at listing time (a corrupt shard).
    """

    kind: str  # "folder", "list" or "shards" (a folder may hold shards too)
    path: list[str] = field(default_factory=list)
    file: list[str] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    error: list[str | None] = field(default_factory=list)
    n_duplicates: int = 0
    n_shards: int = 0
    _seen: set = field(default_factory=set, repr=False)

    def __len__(self) -> int:
        return len(self.path)

    def add(self, path: str, file: str, offset: int = -1, size: int = -1, error: str | None = None) -> None:
        if path in self._seen:
            self.n_duplicates += 1
            return
        self._seen.add(path)
        self.path.append(path)
        self.file.append(file)
        self.offset.append(offset)
        self.size.append(size)
        self.error.append(error)

    def add_shard(self, shard: str) -> None:
        """The image members of an uncompressed tar shard (webdataset layout: ``<key>.<ext>`` files)."""
        self.n_shards += 1
        members = 0
        try:
            with tarfile.open(shard, mode="r:") as tar:  # "r:" = no compression: members are byte ranges
                for m in tar:
                    if m.isfile() and _is_image_name(m.name):
                        self.add(f"{shard}{MEMBER_SEP}{m.name}", shard, m.offset_data, m.size)
                        members += 1
        except (tarfile.TarError, OSError, EOFError) as err:
            self.add(shard, shard, error=f"cannot list the tar shard after {members} image member(s): "
                                         f"{type(err).__name__}: {err}")

    def take(self, keep) -> "InputListing":
        """A listing of the entries whose ``path`` satisfies ``keep`` (resume)."""
        out = InputListing(self.kind, n_duplicates=self.n_duplicates, n_shards=self.n_shards)
        for i, p in enumerate(self.path):
            if keep(p):
                out.add(p, self.file[i], self.offset[i], self.size[i], self.error[i])
        return out

    def tables(self, rows_per_block: int):
        """The listing as Arrow tables of at most ``rows_per_block`` rows (one Ray Data block each)."""
        import pyarrow as pa

        schema = pa.schema([("path", pa.string()), ("file", pa.string()), ("offset", pa.int64()),
                            ("size", pa.int64()), ("error", pa.string())])
        out = []
        for s in range(0, len(self), rows_per_block):
            e = s + rows_per_block
            out.append(pa.table([self.path[s:e], self.file[s:e], self.offset[s:e], self.size[s:e], self.error[s:e]],
                                schema=schema))
        return out


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _expand_braces(pattern: str) -> list[str]:
    """webdataset's ``shard-{0000..0099}.tar`` (zero padding as written); several groups multiply."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def _walk(root: Path, listing: InputListing) -> int:
    """Image files and ``.tar`` shards under ``root`` (sorted, hidden entries skipped); returns the
    number of other files skipped. Symbolic links to folders are not followed."""
    skipped = 0

    def unreadable(err: OSError) -> None:  # a folder that cannot be listed is an error row, not a silent gap
        where = os.path.abspath(err.filename or root)
        listing.add(where, where, error=f"cannot list the folder: {err.strerror or err}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(os.path.abspath(dirpath), name)
            if _is_image_name(name):
                listing.add(full, full)
            elif name.endswith(SHARD_SUFFIX):
                listing.add_shard(full)
            else:
                skipped += 1
    return skipped


def _read_list(list_file: Path, listing: InputListing) -> None:
    """One path per line (relative paths: to the list's folder); blank lines and ``#`` comments skipped.
    A listed path is an input whether or not it exists (a missing one becomes an error row);
    a listed ``.tar`` file is a shard."""
    base = list_file.parent.absolute()
    try:
        text = list_file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise EmbedError(f"cannot read the file list {list_file}: {err}") from None
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        full = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
        if full.endswith(SHARD_SUFFIX) and os.path.isfile(full):
            listing.add_shard(full)
        else:
            listing.add(full, full)


def list_inputs(data: str) -> InputListing:
    """Everything ``--data`` names, as an :class:`InputListing`; :class:`EmbedError` if nothing.

    ``data``: a folder (every image file and ``.tar`` shard under it, recursively), a ``.tar`` shard,
    a shard pattern (``shards/{00000..00099}.tar`` or a glob ``shards/*.tar``), or a text file
    listing one image path per line.
    """
    if any(ch in data for ch in "*?[") or _BRACES.search(data):
        names = sorted({p for pat in _expand_braces(os.path.expanduser(data)) for p in glob.glob(pat)})
        if not names:
            raise EmbedError(f"--data {data}: the pattern matches no file")
        listing = InputListing("shards")
        for name in names:
            full = os.path.abspath(name)
            if name.endswith(SHARD_SUFFIX):
                listing.add_shard(full)
            elif _is_image_name(name):
                listing.add(full, full)
        if not len(listing):
            raise EmbedError(f"--data {data}: the {len(names)} matching file(s) hold no images or .tar shards")
        return listing
    path = Path(os.path.expanduser(data))
    if not path.exists():
        raise EmbedError(f"--data {data} does not exist: pass a folder of images, a file list or tar shards")
    if path.is_dir():
        listing = InputListing("folder")
        skipped = _walk(path, listing)
        if not len(listing):
            raise EmbedError(f"no images under {data} ({skipped} other file(s); image extensions: "
                             f"{', '.join(IMAGE_EXTENSIONS)}; shards: .tar)")
        return listing
    if path.name.endswith(SHARD_SUFFIX):
        listing = InputListing("shards")
        listing.add_shard(str(path.absolute()))
        return listing
    if _is_image_name(path.name):
        raise EmbedError(f"--data {data} is a single image: pass its folder, or a file list naming it")
    listing = InputListing("list")
    _read_list(path, listing)
    if not len(listing):
        raise EmbedError(f"the file list {data} names no images (one path per line expected)")
    return listing


def read_input(file: str, offset: int, size: int) -> bytes:
    """The bytes of one input; ``OSError`` (with a message) when they cannot be had in full."""
    with open(file, "rb") as f:
        if offset < 0:
            n = os.fstat(f.fileno()).st_size
            if n > MAX_INPUT_BYTES:
                raise OSError(f"{n} bytes is over the {MAX_INPUT_BYTES} byte limit for one image")
            return f.read()
        if size > MAX_INPUT_BYTES:
            raise OSError(f"tar member of {size} bytes is over the {MAX_INPUT_BYTES} byte limit for one image")
        f.seek(offset)
        body = f.read(size)
    if len(body) != size:
        raise OSError(f"truncated tar member: read {len(body)} of {size} bytes")
    return body
