"""Image handling (orientation, modes, size bound, formats), caption text, and the shard I/O."""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from ingest_helpers import bomb_png, image_bytes
from PIL import Image

from components.images import EncodeSpec, ImageJob, bound_size, process, to_rgb
from components.shards import ShardReader, ShardWriter, iter_shard, split_key
from components.text import normalize_caption, pre_caption


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_exif_rotated_jpeg_is_stored_upright() -> None:
    # 40 wide × 20 high as stored, left half red; orientation 6 = display rotated 90° clockwise
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif, quality=95)
    res = process(ImageJob(data=buf.getvalue()), EncodeSpec())
    assert res.reason is None and (res.width, res.height) == (20, 40)
    im = _decode(res.data)
    assert im.size == (20, 40)
    top, bottom = np.asarray(im)[2, 10], np.asarray(im)[37, 10]
    assert top[0] > 200 and top[1] < 60  # the red half is on top after the rotation
    assert bottom[0] < 60
    assert "exif" not in im.info  # metadata stripped: no second rotation downstream


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "1", "I;16"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    if mode == "I;16":
        arr = np.full((8, 12), 65535, np.uint16)
        arr[:, :6] = 0
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")  # uint16 → I;16
        data = buf.getvalue()
    else:
        data = image_bytes(12, 8, fmt=fmt, mode=mode)
    assert _decode(data).mode.startswith(mode[0])
    res = process(ImageJob(data=data), EncodeSpec())
    assert res.reason is None
    im = _decode(res.data)
    assert im.mode == "RGB" and im.size == (12, 8)
    if mode == "I;16":  # 16-bit range scaled, not clipped: 0 → 0 and 65535 → 255
        a = np.asarray(im)
        assert a[0, 0].tolist() == [0, 0, 0] and a[0, -1].tolist() == [255, 255, 255]


def test_transparency_is_composited_over_white() -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("size, expect", [((1000, 500), (256, 128)), ((300, 1200), (64, 256)),
                                          ((100, 50), (100, 50))])  # fmt: skip
def test_longer_side_bounded(size: tuple[int, int], expect: tuple[int, int]) -> None:
    assert bound_size(Image.new("RGB", size), 256).size == expect
    data = image_bytes(*size, fmt="JPEG")
    res = process(ImageJob(data=data), EncodeSpec(max_side=256))
    assert (res.width, res.height) == expect == _decode(res.data).size


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_stored_format(fmt: str, pil: str) -> None:
    res = process(ImageJob(data=image_bytes()), EncodeSpec(image_format=fmt, quality=80))
    assert _decode(res.data).format == pil and res.ext == {"jpeg": "jpg"}.get(fmt, fmt)


def test_bomb_rejected_from_header_alone() -> None:
    res = process(ImageJob(data=bomb_png()), EncodeSpec())
    assert res.reason == "decompression_bomb" and len(res.sha256) == 64
    small_limit = process(ImageJob(data=image_bytes(100, 100)), EncodeSpec(max_pixels=5000))
    assert small_limit.reason == "decompression_bomb"


def test_sha256_is_of_original_bytes() -> None:
    import hashlib

    data = image_bytes(fmt="JPEG")
    assert process(ImageJob(data=data), EncodeSpec()).sha256 == hashlib.sha256(data).hexdigest()


# --- captions ----------------------------------------------------------------------------------


def test_caption_normalisation() -> None:
    decomposed = "cafe\u0301"
    assert normalize_caption(decomposed)[0] == unicodedata.normalize("NFC", decomposed) == "café"
    assert normalize_caption("salt &amp; pepper")[0] == "salt & pepper"
    assert normalize_caption("a <b>bold</b> dog<br/>runs")[0] == "a bold dog runs"
    assert normalize_caption("&lt;b&gt; is literal")[0] == "<b> is literal"
    assert normalize_caption("a < b and c > d")[0] == "a < b and c > d"
    assert normalize_caption("  many \t\n spaces\u00a0here ")[0] == "many spaces here"
    assert normalize_caption("ctrl\x00chars\x1f")[0] == "ctrl chars"
    text, reason, _ = normalize_caption("x" * 1500)
    assert reason is None and text == "x" * 1000
    assert normalize_caption("y" * 50, max_chars=10)[0] == "y" * 10


@pytest.mark.parametrize("raw, reason", [
    (None, "empty_caption"), (float("nan"), "empty_caption"), ("", "empty_caption"),
    (" \n\t", "empty_caption"), ("<p></p>", "empty_caption"), (3, "non_string_caption"),
    (["a"], "non_string_caption"), (b"bytes", "non_string_caption"), ("bad \ud800", "invalid_utf8"),
])  # fmt: skip
def test_caption_rejects(raw: object, reason: str) -> None:
    text, got, detail = normalize_caption(raw)
    assert text is None and got == reason and detail


def test_pre_caption_matches_blip() -> None:
    assert pre_caption("A Dog: running!  (fast); ok?", 50) == "a dog running fast ok?"
    assert pre_caption("one two three four", 2) == "one two"
    assert pre_caption("it's a well-known, \"quoted\" #tag~", 50) == "it's a well-known, quoted tag"


# --- shards --------------------------------------------------------------------------------------


def test_shard_writer_round_trip(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_count=2)
    placed = [writer.add(f"{i:06d}", {"png": bytes([i]) * 10, "json": b"{}"}) for i in range(5)]
    writer.close()
    assert placed == ["shards/000000.tar"] * 2 + ["shards/000001.tar"] * 2 + ["shards/000002.tar"]
    assert writer.written == ["shards/000000.tar", "shards/000001.tar", "shards/000002.tar"]
    assert not list(tmp_path.rglob("*.tmp"))
    samples = list(iter_shard(tmp_path / "shards/000001.tar"))
    assert [s.key for s in samples] == ["000002", "000003"]
    assert samples[0].members == {"png": bytes([2]) * 10, "json": b"{}"}
    with ShardReader(tmp_path, max_open=1) as reader:
        assert reader.read("shards/000002.tar", "000004.png") == bytes([4]) * 10
        assert reader.read("shards/000000.tar", "000001.png") == bytes([1]) * 10
        with pytest.raises(KeyError, match="000009.png"):
            reader.read("shards/000000.tar", "000009.png")


def test_shard_writer_abort_leaves_no_tar(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_count=10)
    writer.add("000000", {"png": b"x"})
    writer.abort()
    assert not list((tmp_path / "shards").iterdir())


def test_split_key() -> None:
    assert split_key("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert split_key("abc.JPG") == ("abc", "jpg")
