"""`capfilt ingest`: real-world image-text sources → a validated manifest, rejects and tar shards.

Sources are read by components/formats.py into images with their captions; captions are
normalised (components/text.py) in this process, images are verified, converted and re-encoded
by a pool of worker processes (components/images.py) fed through a bounded window, so memory stays
flat whatever the corpus size, and results come back in order, so the same input gives the same
shards. Each image is stored once (by sha256 of its original bytes) in WebDataset shards
(components/shards.py); a (sha256, caption) pair seen before is a `duplicate` reject. Every row a
source offers ends up either in `manifest.parquet` or in `rejects.parquet` with a reason. Output is
built in a hidden sibling folder and renamed over `DIR` only when everything, validation included,
succeeded. The `ingest` DVC stage lives in components/ingest_stage.py.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

import pandas as pd

from components import formats, images, reasons, schemas
from components.config import IngestConfig
from components.errors import CapfiltError
from components.formats import Reject, Sample, SourceSpec
from components.images import EncodeSpec, ImageJob, ImageResult
from components.shards import ShardWriter, sample_json
from components.text import normalize_caption

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
SUMMARY = "summary.json"
CHUNK = 16  # images per worker task
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: bounds memory, keeps workers busy
LOG_EVERY_S = 10.0

# Called with (manifest, rejects, build folder) before the output is published; raises to abort.
Check = Callable[[pd.DataFrame, pd.DataFrame, Path], None]


@dataclass(frozen=True)
class IngestSummary:
    """Counts of one ingest run (also written to `summary.json`)."""

    out: str
    sources: list[dict[str, str]]
    kind: str
    split: str
    read: int  # rows (image, caption pairs) offered by the sources
    accepted: int
    rejected: dict[str, int]  # reason → rows
    images_stored: int
    shards: int
    bytes_read: int  # original image bytes
    bytes_stored: int  # tar shard bytes
    seconds: float

    def describe(self) -> str:
        """A few human-readable lines."""
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        rate = self.images_stored / self.seconds if self.seconds > 0 else 0.0
        return (
            f"ingested {self.accepted} of {self.read} rows into {self.out} "
            f"({self.images_stored} images in {self.shards} shards, "
            f"{self.bytes_stored / 1e6:.1f} MB, {self.seconds:.1f} s, {rate:.0f} images/s)\n"
            f"rejected: {rej}"
        )


@dataclass
class _State:
    """What the main process accumulates: rows, rejects, stored images, counters."""

    writer: ShardWriter
    kind: str
    split: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    stored: dict[str, tuple[str, str, int, int]] = field(default_factory=dict)  # sha → location
    pairs: set[tuple[str, str]] = field(default_factory=set)
    next_index: Counter[str] = field(default_factory=Counter)
    read: int = 0
    bytes_read: int = 0

    def reject(self, ref: str, reason: str, detail: str) -> None:
        self.read += 1
        self.rejects.append({"ref": ref, "reason": reason, "detail": detail})

    def accept(self, sample: Sample, captions: list[tuple[str, str]], res: ImageResult) -> None:
        self.bytes_read += res.source_bytes
        if res.reason is not None:
            for ref, _ in captions:
                self.reject(ref, res.reason, res.detail)
            return
        if res.sha256 not in self.stored:
            member_key = f"{len(self.stored):06d}"
            shard = self.writer.add(member_key, {
                res.ext: res.data,
                "json": sample_json(sample.image_key, res.sha256, res.width, res.height),
            })  # fmt: skip
            self.stored[res.sha256] = (shard, f"{member_key}.{res.ext}", res.width, res.height)
        shard, member, width, height = self.stored[res.sha256]
        for ref, text in captions:
            if (res.sha256, text) in self.pairs:
                self.reject(ref, reasons.DUPLICATE, "same image bytes and caption as a kept row")
                continue
            self.read += 1
            self.pairs.add((res.sha256, text))
            i = self.next_index[sample.image_key]
            self.next_index[sample.image_key] += 1
            self.rows.append({
                "sample_id": f"{sample.image_key}#{i}", "image_key": sample.image_key,
                "caption": text, "source": self.kind, "split": self.split,
                "width": width, "height": height, "sha256": res.sha256,
                "shard": shard, "member": member, "ref": ref,
            })  # fmt: skip


def encode_spec(cfg: IngestConfig) -> EncodeSpec:
    """The image settings of an `IngestConfig`."""
    return EncodeSpec(
        max_side=cfg.max_side,
        max_pixels=cfg.max_pixels,
        image_format=cfg.image_format,
        quality=cfg.quality,
        png_compress_level=cfg.png_compress_level,
    )


def resolve_workers(workers: int) -> int:
    """`0` means every core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


def _map_images(
    tasks: Iterable[tuple[Any, ImageJob]], spec: EncodeSpec, workers: int
) -> Iterator[tuple[Any, ImageResult]]:
    """`images.process` over `(context, job)` pairs, in order, with bounded work in flight."""
    it = iter(tasks)
    if workers <= 1:
        for ctx, job in it:
            yield ctx, images.process(job, spec)
        return
    # Not fork: a lock held by another thread here (logging, tqdm, an S3 client's pool) could be
    # inherited half-taken. The fork server imports the light image module once for all workers.
    methods = multiprocessing.get_all_start_methods()
    mp = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        mp.set_forkserver_preload(["components.images"])
    with mp.Pool(workers, initializer=images.init_worker, initargs=(spec,)) as pool:
        window: deque[tuple[list[Any], Any]] = deque()
        while chunk := list(islice(it, CHUNK)):
            ctxs = [c for c, _ in chunk]
            window.append((ctxs, pool.apply_async(images.process_chunk, ([j for _, j in chunk],))))
            if len(window) >= workers * IN_FLIGHT_PER_WORKER:
                done_ctxs, future = window.popleft()
                yield from zip(done_ctxs, future.get(), strict=True)
        while window:
            done_ctxs, future = window.popleft()
            yield from zip(done_ctxs, future.get(), strict=True)


class _Progress:
    """tqdm on a terminal, a log line every LOG_EVERY_S seconds otherwise."""

    def __init__(self, label: str) -> None:
        self.label, self.count, self.last = label, 0, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=label, unit="img", dynamic_ncols=True)

    def step(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self.last >= LOG_EVERY_S:
            self.last = time.monotonic()
            log.info("%s: %d images processed", self.label, self.count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _split_captions(sample: Sample, state: _State, max_chars: int) -> list[tuple[str, str]]:
    """Normalise a sample's captions; bad ones become rejects, good ones are returned."""
    good = []
    for cap in sample.captions:
        text, reason, detail = normalize_caption(cap.raw, max_chars)
        if text is None:
            assert reason is not None
            state.reject(cap.ref, reason, detail)
        else:
            good.append((cap.ref, text))
    return good


def _tasks(
    items: Iterable[formats.Item], state: _State, max_chars: int
) -> Iterator[tuple[tuple[Sample, list[tuple[str, str]]], ImageJob]]:
    """Reader items → image tasks; reader rejects and bad captions go straight to `state`."""
    for item in items:
        if isinstance(item, Reject):
            state.reject(item.ref, item.reason, item.detail)
            continue
        good = _split_captions(item, state, max_chars)
        if good:  # an image none of whose captions survive is not worth decoding
            yield (item, good), item.job


def _build_dir(out: Path) -> Path:
    build = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    build.mkdir(parents=True)
    return build


def check_out(out: Path) -> None:
    """Refuse an output path that is a file or a non-empty folder that ingest did not write."""
    if out.is_file():
        raise CapfiltError(f"{out}: exists and is a file; --out must be a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY).exists():
        raise CapfiltError(f"{out}: exists and is not an ingest output; refusing to replace it")


def publish(build: Path, out: Path) -> None:
    """Rename `build` to `out`, replacing an earlier `out` only now that `build` is complete."""
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(build, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_outputs(state: _State, build: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = pd.DataFrame(state.rows, columns=schemas.columns("ingested"))
    manifest = manifest.astype({"width": "int64", "height": "int64"})
    rejects = pd.DataFrame(state.rejects, columns=schemas.columns("rejects"))
    schemas.write_manifest(manifest, build / MANIFEST, "ingested")
    schemas.write_manifest(rejects, build / REJECTS, "rejects")
    return manifest, rejects


def _open_sources(specs: list[SourceSpec]) -> tuple[list[dict[str, str]], Iterator[formats.Item]]:
    """Open every source first, so that a whole-source error stops the run before any work."""
    opened = [formats.read_source(spec) for spec in specs]
    described = [{"path": s.path, "format": fmt} for s, (fmt, _) in zip(specs, opened, strict=True)]
    return described, chain.from_iterable(items for _, items in opened)


def run(
    specs: list[SourceSpec],
    out: Path,
    cfg: IngestConfig,
    kind: str = "web",
    split: str = "train",
    check: Check | None = None,
) -> IngestSummary:
    """Ingest `specs` into `out` (manifest, rejects, shards, summary); see the module docstring."""
    if not specs:
        raise CapfiltError("no source given")
    out = Path(os.path.abspath(out))  # "." and ".." have no sibling to build in
    check_out(out)
    start = time.monotonic()
    described, items = _open_sources(specs)
    build = _build_dir(out)
    try:
        state = _State(ShardWriter(build, cfg.shard_size), kind, split)
        progress = _Progress(f"ingest {out.name}")
        try:
            tasks = _tasks(items, state, cfg.max_caption_chars)
            results = _map_images(tasks, encode_spec(cfg), resolve_workers(cfg.workers))
            for (sample, good), res in results:
                state.accept(sample, good, res)
                progress.step()
            state.writer.close()
        finally:
            progress.close()
            state.writer.abort()
        manifest, rejects = _write_outputs(state, build)
        summary = _summary(state, out, described, kind, split, time.monotonic() - start)
        (build / SUMMARY).write_text(json.dumps(asdict(summary), indent=2) + "\n", "utf-8")
        if check is not None:
            check(manifest, rejects, build)
        publish(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _warn_if_nothing_found(summary, specs)
    log.info("ingest %s: %d of %d rows accepted, %d images stored in %.1f s", out, summary.accepted,
             summary.read, summary.images_stored, summary.seconds)  # fmt: skip
    return summary


def _summary(state: _State, out: Path, described: list[dict[str, str]], kind: str, split: str,
             seconds: float) -> IngestSummary:  # fmt: skip
    return IngestSummary(
        out=str(out),
        sources=described,
        kind=kind,
        split=split,
        read=state.read,
        accepted=len(state.rows),
        rejected=dict(sorted(Counter(r["reason"] for r in state.rejects).items())),
        images_stored=len(state.stored),
        shards=len(state.writer.written),
        bytes_read=state.bytes_read,
        bytes_stored=state.writer.n_bytes,
        seconds=round(seconds, 3),
    )


def _warn_if_nothing_found(summary: IngestSummary, specs: list[SourceSpec]) -> None:
    if summary.accepted == 0 and summary.rejected.get(reasons.MISSING_FILE, 0):
        roots = ", ".join(s.image_root or f"the folder of {s.path}" for s in specs)
        log.warning("no image was found under %s; is --image-root right?", roots)
