"""Small fixtures for the ingest tests: images in every mode, crafted bad files, tar shards."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.config import IngestConfig


def cfg(**update: object) -> IngestConfig:
    """A fast config: one process, small shards."""
    base = {"workers": 1, "shard_size": 3}
    base.update(update)
    return IngestConfig.model_validate(base)


def image_bytes(w: int = 24, h: int = 16, seed: int = 0, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def bomb_png(side: int = 30000) -> bytes:
    """A valid-looking PNG header claiming side×side RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))  # fmt: skip


def good_images(root: Path, n: int = 3) -> list[str]:
    """n distinct PNGs under root/images; returns their paths relative to root."""
    rels = []
    for i in range(n):
        rel = f"images/good_{i}.png"
        write(root / rel, image_bytes(seed=100 + i))
        rels.append(rel)
    return rels


def blip_json(root: Path, rows: list[dict[str, object]], name: str = "web.json") -> Path:
    path = root / name
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def make_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar with `KEY.ext` members, in the given order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet")


def rejects(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "rejects.parquet")


def reasons_by_ref(out: Path) -> dict[str, str]:
    df = rejects(out)
    return dict(zip(df["ref"], df["reason"], strict=True))
