"""Low-level tar I/O shared by the writer, the verifier and the reader.

Tars are written with fixed headers (mtime 0, uid/gid 0, mode 0644) so that the same
samples always give the same bytes and sha256. Reading never extracts and never unpickles;
member names are checked so that nothing can escape its folder.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from .format import split_member

BLOCK = 512
INDEX_VERSION = "v1.2"  # DALI wds2idx format


class ShardError(ValueError):
    """A shard or sample that cannot be read; the message names the shard and sample."""


def safe_member_name(name: str) -> str:
    """Reject names that could escape the shard's folder or hide in a subfolder."""
    p = PurePosixPath(name)
    if name.startswith("/") or "\\" in name or ".." in p.parts or len(p.parts) != 1 or not name:
        raise ShardError(f"unsafe tar member name {name!r} (absolute, nested or with '..')")
    return name


class HashingWriter(io.RawIOBase):
    """File wrapper that hashes and counts bytes as tarfile writes them (one pass, no re-read)."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.nbytes


@dataclass
class IndexEntry:
    """One sample in the DALI index: its members as (ext, data offset, size, name)."""

    key: str
    members: list[tuple[str, int, int, str]]

    def line(self) -> str:
        return " ".join(f"{e} {o} {s} {n}" for e, o, s, n in self.members)

    def member(self, ext: str):
        for e, o, s, n in self.members:
            if e == ext:
                return o, s
        return None

    @property
    def exts(self) -> set[str]:
        return {m[0] for m in self.members}


class TarShardWriter:
    """Writes one WebDataset tar and its DALI-compatible index, atomically (.partial -> final)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self._f = open(self.tmp, "wb")
        self._h = HashingWriter(self._f)
        self._tar = tarfile.open(fileobj=self._h, mode="w", format=tarfile.USTAR_FORMAT)
        self.entries: list[IndexEntry] = []

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        entry = IndexEntry(key, [])
        for ext, data in members:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(safe_member_name(name))
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            offset = self._h.nbytes + BLOCK  # data follows one ustar header block
            self._tar.addfile(info, io.BytesIO(data))
            entry.members.append((ext, offset, len(data), name))
        self.entries.append(entry)

    @property
    def nbytes(self) -> int:
        return self._h.nbytes

    def close(self) -> dict:
        self._tar.close()
        self._f.close()
        self.tmp.replace(self.path)
        idx = self.path.with_suffix(".idx")
        write_index(idx, self.entries)
        return {"bytes": self._h.nbytes, "sha256": self._h.sha.hexdigest(), "samples": len(self.entries)}


def write_index(path: Path, entries: list[IndexEntry]) -> None:
    text = f"{INDEX_VERSION} {len(entries)}\n" + "".join(e.line() + "\n" for e in entries)
    tmp = Path(str(path) + ".partial")
    tmp.write_text(text)
    tmp.replace(path)


def read_index(path: Path) -> list[IndexEntry]:
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ShardError(f"{path}: empty index")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise ShardError(f"{path}: index header {lines[0]!r}, expected '{INDEX_VERSION} <count>'")
    entries = []
    for ln in lines[1:]:
        tok = ln.split(" ")
        if len(tok) % 4:
            raise ShardError(f"{path}: malformed index line {ln[:80]!r}")
        members = [(tok[i], int(tok[i + 1]), int(tok[i + 2]), tok[i + 3]) for i in range(0, len(tok), 4)]
        entries.append(IndexEntry(split_member(members[0][3])[0], members))
    if len(entries) != int(head[1]):
        raise ShardError(f"{path}: index says {head[1]} samples but lists {len(entries)}")
    return entries


def iter_tar_samples(path: Path, index: list | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a tar, grouping consecutive members by key. Raises ShardError on damage.

    With `index`, the DALI index entries of the members read are appended to it on the way,
    so a verifier needs no second pass over the shard.

    tarfile treats a bad or truncated header after the first as the end of the archive;
    we insist the archive really ends with a zero block there, so damage cannot pass as
    a shorter shard.
    """
    path = Path(path)
    key, group, last = None, {}, None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                name = safe_member_name(m.name)
                if not m.isreg():
                    raise ShardError(f"{path.name}: member {name!r} is not a regular file")
                k, ext = split_member(name)
                try:
                    data = tar.extractfile(m).read()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    raise ShardError(f"{path.name}: sample {k}: member {name} truncated ({e})") from e
                if len(data) != m.size:
                    raise ShardError(f"{path.name}: sample {k}: member {name} truncated "
                                     f"({len(data)} of {m.size} bytes)")
                last = name
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                    if index is not None:
                        index.append(IndexEntry(k, []))
                if index is not None:
                    index[-1].members.append((ext, m.offset_data, m.size, name))
                group[ext] = data
            end = tar.offset
            tar.fileobj.seek(end)
            tail = tar.fileobj.read(BLOCK)
    except tarfile.ReadError as e:
        raise ShardError(f"{path.name}: corrupt tar ({e})") from e
    where = f" after member {last}" if last else ""
    if len(tail) < BLOCK:
        raise ShardError(f"{path.name}: truncated tar at byte {end}{where} (no end-of-archive marker)")
    if tail.count(0) != BLOCK:
        raise ShardError(f"{path.name}: corrupt tar header at byte {end}{where}")
    if key is not None:
        yield key, group


def read_sample_members(f, entry: IndexEntry) -> dict[str, bytes]:
    """Random access to one sample through its index entry (what DALI's reader does too).

    `f` is a binary file, or a memoryview of an mmapped shard (members come back as zero-copy
    memoryviews then)."""
    out = {}
    for ext, off, size, name in entry.members:
        if isinstance(f, memoryview):
            data = f[off:off + size]
        else:
            f.seek(off)
            data = f.read(size)
        if len(data) != size:
            raise ShardError(f"sample {entry.key}: member {name} truncated ({len(data)} of {size} bytes)")
        out[ext] = data
    return out


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
