"""Source readers for `capfilt ingest`: COCO, Karpathy, BLIP json, WebDataset tars, CSV, parquet.

Each reader turns one source into a stream of `Sample`s (one image with all the captions the
source gives it, so that the image is decoded and stored once) and `Reject`s (rows refused before
any image is read: a path escaping the image root, an annotation naming no image, undecodable
text). Annotation files are metadata and are read whole; tar shards are streamed member by member,
their image bytes travelling inside the `Sample`. A source that cannot be read as a whole (missing,
malformed JSON, wrong top-level structure, a bad tar header, a missing column) raises
`CapfiltError` naming the file and the problem. Image paths are relative to the image root (the
annotation file's folder unless given); `..` escapes are refused, and absolute paths are accepted
only when they lie inside the root (BLIP's pre-training json lists absolute paths).
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from components import reasons, storage
from components.errors import CapfiltError
from components.images import ImageJob
from components.shards import iter_tar

log = logging.getLogger(__name__)

FORMATS = ("auto", "coco", "karpathy", "blip", "webdataset", "csv", "parquet")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_COLUMNS = ("image", "filepath", "file_name", "image_path", "path")
CAPTION_COLUMNS = ("caption", "text", "title")


@dataclass(frozen=True)
class SourceSpec:
    """One source to ingest (a file, a folder/prefix of tar shards, or an S3 URI)."""

    path: str
    format: str = "auto"
    image_root: str | None = None  # default: the annotation file's folder
    image_column: str | None = None  # csv/parquet; default: first of IMAGE_COLUMNS present
    caption_column: str | None = None  # csv/parquet; default: first of CAPTION_COLUMNS present


@dataclass(frozen=True)
class Caption:
    """One raw caption and the row it came from (`<source file>:<index or key>`)."""

    ref: str
    raw: object


@dataclass(frozen=True)
class Sample:
    """One image of a source and every caption the source gives it."""

    image_key: str
    ref: str
    job: ImageJob
    captions: tuple[Caption, ...]


@dataclass(frozen=True)
class Reject:
    """A row refused by the reader."""

    ref: str
    reason: str
    detail: str


Item = Sample | Reject


@dataclass
class _Group:
    location: str
    captions: list[Caption] = field(default_factory=list)


def resolve(root: str, rel: object) -> tuple[str, str] | tuple[None, Reject]:
    """`(image_key, location)` for an image path relative to `root`, or `(None, reason)`."""
    if not isinstance(rel, str) or not rel.strip():
        return None, Reject("", reasons.NO_IMAGE_FOR_ANNOTATION, f"no image path (got {rel!r})")
    path = rel.strip()
    if posixpath.isabs(path) or storage.is_s3(path):
        local = not storage.is_s3(root)
        base = (os.path.abspath(root) if local else root).rstrip("/") + "/"
        if not (storage.is_s3(root) == storage.is_s3(path) and path.startswith(base)):
            return None, Reject("", reasons.PATH_ESCAPES_ROOT, f"{path} is outside {root}")
        path = path[len(base) :]
    key = posixpath.normpath(path)
    if key == ".." or key.startswith("../") or posixpath.isabs(key) or key == ".":
        return None, Reject("", reasons.PATH_ESCAPES_ROOT, f"{rel} escapes {root}")
    return key, storage.join(root, key)


def _load_json(path: str) -> Any:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CapfiltError(f"{path}: annotation file not found") from None
    except OSError as exc:
        raise CapfiltError(f"{path}: cannot read: {exc}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CapfiltError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CapfiltError(f"{path}: malformed JSON: {exc.msg} (line {exc.lineno})") from None


def json_kind(obj: Any, path: str) -> str:
    """coco | karpathy | blip, from the structure of a parsed JSON annotation file."""
    if isinstance(obj, dict) and "annotations" in obj and "images" in obj:
        return "coco"
    if isinstance(obj, list):
        rows = [r for r in obj[:100] if isinstance(r, dict)]
        if any("image_id" in r or isinstance(r.get("caption"), list) for r in rows):
            return "karpathy"
        return "blip"
    raise CapfiltError(
        f"{path}: unrecognised JSON annotations: expected a COCO object with 'images' and "
        "'annotations', or a list of {image, caption} rows"
    )


def detect_format(path: str) -> str:
    """The format of a source from its extension (and, for tar folders, its content)."""
    lower = path.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "webdataset"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".json"):
        return "json"
    if storage.is_dir(path):
        if storage.list_files(path, TAR_SUFFIXES):
            return "webdataset"
        raise CapfiltError(f"{path}: a folder with no {'/'.join(TAR_SUFFIXES)} shards directly in it; "
                           "cannot detect the format; pass --format")
    if not storage.exists(path):
        raise CapfiltError(f"{path}: source not found")
    raise CapfiltError(f"{path}: cannot detect the format from its name; pass --format")


def _emit(groups: dict[str, _Group], source: str) -> Iterator[Sample]:
    for key, group in groups.items():
        ref = f"{source}:{key}"
        yield Sample(key, ref, ImageJob(location=group.location), tuple(group.captions))


def _add(groups: dict[str, _Group], root: str, image: object, cap: Caption) -> Reject | None:
    resolved = resolve(root, image)
    if resolved[0] is None:
        rej = resolved[1]
        assert isinstance(rej, Reject)
        return Reject(cap.ref, rej.reason, rej.detail)
    key, location = resolved
    groups.setdefault(key, _Group(location)).captions.append(cap)
    return None


def read_coco(path: str, obj: Any, root: str) -> Iterator[Item]:
    """COCO captions: `images[{id, file_name}]` + `annotations[{image_id, caption}]`."""
    images, anns = obj.get("images"), obj.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise CapfiltError(f"{path}: COCO 'images' and 'annotations' must be lists")
    files: dict[Any, object] = {}
    for img in images:
        if isinstance(img, dict) and "id" in img:
            files[_hashable(img["id"])] = img.get("file_name")
    groups: dict[str, _Group] = {}
    for i, ann in enumerate(anns):
        ref = f"{path}:{i}"
        image_id = _hashable(ann.get("image_id")) if isinstance(ann, dict) else None
        if image_id not in files:
            detail = f"annotation {i} names image_id {image_id!r}, which is not in 'images'"
            yield Reject(ref, reasons.NO_IMAGE_FOR_ANNOTATION, detail)
            continue
        rej = _add(groups, root, files[image_id], Caption(ref, ann.get("caption")))
        if rej is not None:
            yield rej
    yield from _emit(groups, path)


def _hashable(value: object) -> object:
    return value if isinstance(value, (int, str, float, type(None))) else repr(value)


def read_rows(path: str, obj: Any, root: str) -> Iterator[Item]:
    """Karpathy (`{image, caption: str|list, image_id?}`) and BLIP (`{image, caption}`) lists."""
    if not isinstance(obj, list):
        raise CapfiltError(f"{path}: expected a JSON list of {{image, caption}} rows")
    groups: dict[str, _Group] = {}
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            detail = f"row {i} is a {type(row).__name__}, not an object"
            yield Reject(f"{path}:{i}", reasons.NO_IMAGE_FOR_ANNOTATION, detail)
            continue
        raw = row.get("caption")
        captions = raw if isinstance(raw, list) else [raw]
        for j, text in enumerate(captions):
            ref = f"{path}:{i}" if not isinstance(raw, list) else f"{path}:{i}.{j}"
            rej = _add(groups, root, row.get("image"), Caption(ref, text))
            if rej is not None:
                yield rej
    yield from _emit(groups, path)


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], path: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise CapfiltError(f"{path}: no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise CapfiltError(
        f"{path}: none of the columns {', '.join(candidates)} found "
        f"(columns: {', '.join(columns)});"
        " name one with --image-column / --caption-column"
    )


def read_table(spec: SourceSpec, fmt: str, root: str) -> Iterator[Item]:
    """CSV/TSV or parquet with an image-path column and a caption column."""
    import pandas as pd

    path = spec.path
    try:
        data = io.BytesIO(storage.read_bytes(path))
        if fmt == "parquet":
            df = pd.read_parquet(data)
        else:
            sep = "\t" if path.lower().endswith(".tsv") else ","
            df = pd.read_csv(data, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise CapfiltError(f"{path}: file not found") from None
    except Exception as exc:  # pandas/pyarrow parse errors have many types
        raise CapfiltError(f"{path}: cannot read as {fmt}: {type(exc).__name__}: {exc}") from None
    columns = [str(c) for c in df.columns]
    image_col = _pick(columns, spec.image_column, IMAGE_COLUMNS, path)
    caption_col = _pick(columns, spec.caption_column, CAPTION_COLUMNS, path)
    groups: dict[str, _Group] = {}
    for i, (image, text) in enumerate(zip(df[image_col], df[caption_col], strict=True)):
        rej = _add(groups, root, image, Caption(f"{path}:{i}", text))
        if rej is not None:
            yield rej
    yield from _emit(groups, path)


def _tar_caption(sample_members: dict[str, bytes], ref: str) -> Caption | Reject:
    if "txt" in sample_members:
        try:
            return Caption(ref, sample_members["txt"].decode("utf-8"))
        except UnicodeDecodeError as exc:
            detail = f".txt is not valid UTF-8 ({exc.reason} at byte {exc.start})"
            return Reject(ref, reasons.INVALID_UTF8, detail)
    meta: object = None
    if "json" in sample_members:
        try:
            meta = json.loads(sample_members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return Reject(ref, reasons.EMPTY_CAPTION, "no .txt member and the .json is unreadable")
    if isinstance(meta, dict) and "caption" in meta:
        return Caption(ref, meta["caption"])
    return Reject(ref, reasons.EMPTY_CAPTION, "no .txt member and no 'caption' in .json")


def read_tar(path: str) -> Iterator[Item]:
    """One WebDataset/img2dataset shard: `KEY.jpg|png|webp` + `KEY.txt` (+ `KEY.json`)."""
    try:
        with storage.open_stream(path) as stream:
            for sample in iter_tar(stream):
                ref = f"{path}:{sample.key}"
                image_ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
                cap = _tar_caption(sample.members, ref)
                if image_ext is None:
                    exts = ", ".join(sorted(sample.members)) or "nothing"
                    detail = f"key {sample.key} has no image member (has {exts})"
                    yield Reject(ref, reasons.NO_IMAGE_FOR_ANNOTATION, detail)
                elif isinstance(cap, Reject):
                    yield cap
                else:
                    job = ImageJob(data=sample.members[image_ext])
                    yield Sample(sample.key, ref, job, (cap,))
    except FileNotFoundError:
        raise CapfiltError(f"{path}: tar shard not found") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CapfiltError(f"{path}: unreadable tar shard: {exc}") from None


def read_webdataset(path: str) -> Iterator[Item]:
    """A tar shard, or every `*.tar` directly in a folder / S3 prefix, in name order."""
    if path.lower().endswith(TAR_SUFFIXES):
        yield from read_tar(path)
        return
    if not storage.is_dir(path):
        raise CapfiltError(f"{path}: not found")
    tars = storage.list_files(path, TAR_SUFFIXES)
    if not tars:
        raise CapfiltError(f"{path}: no .tar shards in this folder")
    for tar in tars:
        yield from read_tar(tar)


def read_source(spec: SourceSpec) -> tuple[str, Iterator[Item]]:
    """The detected format and the item stream of one source. Annotation files are loaded (and
    checked as a whole) here, before the stream is returned; tar shards are checked as read."""
    if spec.format not in FORMATS:
        raise CapfiltError(f"unknown format {spec.format!r}; formats: {', '.join(FORMATS)}")
    fmt = detect_format(spec.path) if spec.format == "auto" else spec.format
    if fmt == "webdataset":
        return fmt, read_webdataset(spec.path)
    if not storage.exists(spec.path):
        raise CapfiltError(f"{spec.path}: source file not found")
    root = spec.image_root if spec.image_root is not None else storage.parent(spec.path)
    if fmt in ("csv", "parquet"):
        return fmt, read_table(spec, fmt, root)
    obj = _load_json(spec.path)
    kind = json_kind(obj, spec.path) if fmt == "json" else fmt
    if kind == "coco":
        if not isinstance(obj, dict):
            raise CapfiltError(f"{spec.path}: COCO annotations must be a JSON object")
        return kind, read_coco(spec.path, obj, root)
    return kind, read_rows(spec.path, obj, root)
