"""One image through ingest: read, hash, verify, decode, orient, convert, resize, re-encode.

This module runs inside the ingest worker processes, so it imports only Pillow, numpy and the
storage helpers (boto3 is imported lazily, on the first S3 read). `process` never raises for bad
input: every failure becomes an `ImageResult` with a reason from components/reasons.py and a
detail. The pixel limit is checked from the header, before any pixel is decoded, so a 30000×30000
PNG costs a few bytes of parsing, not gigabytes. What is stored is always 8-bit RGB, upright
(EXIF orientation applied), no longer side than `max_side`, without metadata, in the configured
format; its width/height are those of the stored image. The sha256 is of the original bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from components import reasons, storage

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a reject, never grey padding

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # stored format → member extension
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class EncodeSpec:
    """How images are checked and stored (from `IngestConfig`)."""

    max_side: int = 512  # longer side of the stored image, in pixels
    max_pixels: int = 89_478_485  # width × height above this is a decompression bomb
    image_format: str = "png"  # png | jpeg | webp
    quality: int = 90  # jpeg / webp quality
    png_compress_level: int = 6  # 0 (fast, big) .. 9 (slow, small)


@dataclass(frozen=True)
class ImageJob:
    """Where one image comes from: a path/URI to read, or bytes already read (tar members)."""

    location: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class ImageResult:
    """The stored image (`reason is None`) or why there is none."""

    reason: str | None
    detail: str = ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    data: bytes = b""  # the re-encoded image
    ext: str = ""
    source_bytes: int = 0


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _read(job: ImageJob) -> bytes:
    if job.data is not None:
        return job.data
    assert job.location is not None
    try:
        return storage.read_bytes(job.location)
    except FileNotFoundError:
        raise _Reject(reasons.MISSING_FILE, f"no such file: {job.location}") from None
    except IsADirectoryError:
        raise _Reject(reasons.NOT_AN_IMAGE, f"a folder, not a file: {job.location}") from None
    except OSError as exc:
        raise _Reject(reasons.UNREADABLE_IMAGE, f"cannot read {job.location}: {exc}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; reject bombs before decoding."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _Reject(reasons.DECOMPRESSION_BOMB, str(exc)) from None
        except UnidentifiedImageError:
            raise _Reject(reasons.NOT_AN_IMAGE, "not a recognised image format") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise _Reject(reasons.UNREADABLE_IMAGE, f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise _Reject(reasons.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > {max_pixels}")
    return im


def _failure(exc: Exception) -> _Reject:
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "truncat" in lowered or isinstance(exc, EOFError) or "broken data stream" in lowered:
        return _Reject(reasons.TRUNCATED_IMAGE, text)
    return _Reject(reasons.UNREADABLE_IMAGE, text)


def _decode(data: bytes, spec: EncodeSpec) -> Image.Image:
    """Verify the file, then decode it (at reduced scale when the format allows)."""
    try:
        _open(data, spec.max_pixels).verify()  # structure and checksums; invalidates the object
        im = _open(data, spec.max_pixels)
        w, h = im.size
        scale = spec.max_side / max(w, h)
        if scale < 1 and im.format == "JPEG":
            # JPEG can decode at 1/2, 1/4, 1/8 directly: much faster and lighter for big photos.
            im.draft(im.mode, (math.ceil(w * scale), math.ceil(h * scale)))
        im.load()
        return im
    except _Reject:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, zlib.error...
        raise _failure(exc) from None


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a corrupt EXIF block is not a corrupt image: keep it as stored
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is composited over white."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)  # (H, W)
        if im.mode != "F" and (im.mode in _SIXTEEN_BIT or arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range → 8-bit
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def bound_size(im: Image.Image, max_side: int) -> Image.Image:
    """Downscale (keeping the aspect ratio) so that the longer side is at most `max_side`."""
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode(im: Image.Image, spec: EncodeSpec) -> bytes:
    """Re-encode an RGB image in the stored format, without metadata."""
    buf = io.BytesIO()
    if spec.image_format == "png":
        im.save(buf, "PNG", compress_level=spec.png_compress_level)
    elif spec.image_format == "jpeg":
        im.save(buf, "JPEG", quality=spec.quality)
    elif spec.image_format == "webp":
        im.save(buf, "WEBP", quality=spec.quality, method=4)
    else:
        raise ValueError(f"unknown image format {spec.image_format!r}")
    return buf.getvalue()


def process(job: ImageJob, spec: EncodeSpec) -> ImageResult:
    """Read, verify and store one image; bad input becomes a result with a reason, never raises."""
    try:
        data = _read(job)
        if not data:
            raise _Reject(reasons.EMPTY_FILE, "the file is empty (0 bytes)")
        digest = hashlib.sha256(data).hexdigest()
        try:
            im = _decode(data, spec)
            im = bound_size(to_rgb(_upright(im)), spec.max_side)
            out = encode(im, spec)
        except _Reject as rej:
            return ImageResult(rej.reason, rej.detail, sha256=digest, source_bytes=len(data))
        except Exception as exc:  # a mode/plugin Pillow cannot convert or encode
            return ImageResult(reasons.UNREADABLE_IMAGE, f"{type(exc).__name__}: {exc}",
                               sha256=digest, source_bytes=len(data))  # fmt: skip
        return ImageResult(None, "", digest, im.width, im.height, out,
                           EXTENSIONS[spec.image_format], len(data))  # fmt: skip
    except _Reject as rej:
        return ImageResult(rej.reason, rej.detail)


# --- worker-process entry points (multiprocessing pickles these by name) -----------------------

_WORKER_SPEC: EncodeSpec | None = None


def init_worker(spec: EncodeSpec) -> None:
    """Pool initializer: remember the spec once instead of pickling it with every job."""
    global _WORKER_SPEC
    _WORKER_SPEC = spec


def process_chunk(jobs: list[ImageJob]) -> list[ImageResult]:
    """Process a chunk of jobs in a worker set up by `init_worker`."""
    assert _WORKER_SPEC is not None, "init_worker was not called"
    return [process(job, _WORKER_SPEC) for job in jobs]
