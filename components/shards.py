"""WebDataset tar shards: the writer `capfilt ingest` stores images with, and the readers.

A shard is a plain POSIX tar named `000000.tar`, `000001.tar`, ... whose members are grouped by
key in the WebDataset way: `KEY.png` (or `.jpg`/`.webp`) and `KEY.json` (the image key, sha256 and
size). Keys are zero-padded running numbers, so shards sort and stream in ingest order. A shard is
written to `NAME.tar.tmp` and renamed when it is full (or the writer closes), so a crash never
leaves a half-written `.tar`. Members carry a fixed mtime and owner so that the same input gives
byte-identical shards. Readers: `iter_shard` streams one tar forward (any `KEY.ext` grouping, also
for foreign img2dataset shards); `ShardReader` opens members at random for a manifest's
`shard`/`member` columns, keeping a few tar indexes open.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

SHARD_DIR = "shards"
_MTIME = 0  # fixed member mtime: reproducible bytes


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/abc.seg.png` → key `dir/abc`, extension `seg.png`."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, (ext.lower() if dot else "")


@dataclass
class ShardWriter:
    """Appends samples to numbered tar shards of at most `max_count` samples each."""

    folder: Path  # the manifest's folder; shards go to folder/shards/
    max_count: int = 1000
    _index: int = 0
    _count: int = 0
    _tar: tarfile.TarFile | None = None
    _tmp: Path | None = None
    written: list[str] = field(default_factory=list)  # shard paths relative to `folder`
    n_bytes: int = 0

    def _relpath(self, index: int) -> str:
        return f"{SHARD_DIR}/{index:06d}.tar"

    def _open_next(self) -> None:
        path = self.folder / self._relpath(self._index)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        final = self._tmp.with_name(self._tmp.name[: -len(".tmp")])
        os.replace(self._tmp, final)
        self.n_bytes += final.stat().st_size
        self.written.append(self._relpath(self._index))
        self._tar, self._tmp = None, None
        self._index += 1

    def add(self, key: str, members: dict[str, bytes]) -> str:
        """Write one sample (`{ext: bytes}`); return its shard's path relative to `folder`."""
        if self._tar is None:
            self._open_next()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        shard = self._relpath(self._index)
        self._count += 1
        if self._count >= self.max_count:
            self._finish()
        return shard

    def close(self) -> None:
        """Finish the open shard (if any)."""
        self._finish()

    def abort(self) -> None:
        """Drop the open shard's temporary file."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar, self._tmp = None, None


def sample_json(image_key: str, sha256: str, width: int, height: int) -> bytes:
    """The `KEY.json` member stored next to each image."""
    meta = {"image_key": image_key, "sha256": sha256, "width": width, "height": height}
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class ShardSample:
    """One key's members from a tar stream."""

    key: str
    members: dict[str, bytes]  # extension (lower case) → bytes
    index: int  # position of the key in the shard


def iter_tar(stream: BinaryIO) -> Iterator[ShardSample]:
    """Stream a tar (plain or compressed) and yield its samples; members of one key must be
    consecutive, as WebDataset writers store them. Raises `tarfile.TarError` on a bad header."""
    current: str | None = None
    members: dict[str, bytes] = {}
    index = 0
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_key(info.name)
            if key != current and current is not None:
                yield ShardSample(current, members, index)
                index, members = index + 1, {}
            current = key
            f = tar.extractfile(info)
            members[ext] = f.read() if f is not None else b""
    if current is not None:
        yield ShardSample(current, members, index)


def iter_shard(path: Path | str) -> Iterator[ShardSample]:
    """Stream the samples of one local tar shard, in order."""
    with open(path, "rb") as f:
        yield from iter_tar(f)


class ShardReader:
    """Random access to `(shard, member)` pairs of a manifest, relative to its folder.

    Keeps at most `max_open` shards open (least recently used closed first); each open shard
    holds its member index, so a lookup is a seek and a read. Not shared across processes:
    give each data-loader worker its own reader.
    """

    def __init__(self, root: Path | str, max_open: int = 8) -> None:
        self.root = Path(root)
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]]
        self._open = OrderedDict()

    def _tar(self, shard: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        tar = tarfile.open(self.root / shard, "r:")
        entry = (tar, {m.name: m for m in tar.getmembers()})
        self._open[shard] = entry
        if len(self._open) > self.max_open:
            _, (old, _) = self._open.popitem(last=False)
            old.close()
        return entry

    def read(self, shard: str, member: str) -> bytes:
        """The bytes of `member` in `shard`; `KeyError` names both when it is absent."""
        tar, index = self._tar(shard)
        if member not in index:
            raise KeyError(f"{shard}: no member {member!r}")
        f = tar.extractfile(index[member])
        assert f is not None
        return f.read()

    def close(self) -> None:
        """Close every open shard."""
        while self._open:
            _, (tar, _) = self._open.popitem()
            tar.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
