"""`capfilt synth`: the embedded synthetic corpus, bit-for-bit deterministic from its seed.

The corpus has three splits drawn from a world of coloured shapes (components/synth_world.py):
`human/` (COCO captions format, several clean paraphrases per image), `web/` (BLIP pre-train
format, one alt-text per image, with `truth.csv` keeping each text's noise kind and the scene
ground truth, which no training code reads) and `test/` (Karpathy test format with references,
and `scenes.jsonl`). The test split is held out by pixels: a drawn test scene whose image equals
a human, web or earlier test image is drawn again (the world repeats small scenes), so no test
image was seen in training. Each split draws its scenes and its texts from two numpy generators
seeded with (seed, split, stream), so changing one split's size leaves the other splits' bytes alone
(the test split's only when the human and web images it must avoid stay the same). The
world is sized for a tiny ViT: 64×64 images with 16-pixel patches give a 4×4 token grid whose
2×2 quadrants are the positions, and five strongly different silhouettes keep shapes legible at
that grid. The web noise mix defaults to mostly unrelated or uninformative text (other images'
texts, junk), as on the real web, with a smaller share of single-attribute errors. JSON is
written with sorted keys and PNGs with a fixed compression level and no metadata; everything is
written into a temporary sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.config import NoiseMix, SynthConfig
from components.errors import CapfiltError
from components.synth_preview import check_preview_path, write_preview
from components.synth_score import (
    CaptionScore,
    ParsedScene,
    load_scenes,
    parse_caption,
    score_captions,
)
from components.synth_text import (
    Mention,
    human_captions,
    junk_text,
    render_web,
    specs_of,
    web_mentions,
    wrong_attribute,
)
from components.synth_world import (
    COLOURS,
    Scene,
    colours_per_shape,
    draw_scene,
    is_consistent,
    sample_scene,
)

__all__ = [
    "CaptionScore",
    "ParsedScene",
    "Scene",
    "SynthSummary",
    "check_preview_path",
    "load_scenes",
    "noise_quota",
    "parse_caption",
    "run",
    "score_captions",
    "write_preview",
]

log = logging.getLogger(__name__)

NOISE_KINDS = ("correct", "wrong_attribute", "other_image", "junk")
_SPLITS = {"human": 0, "web": 1, "test": 2}  # the split's number in its generators' seeds
_TRUTH_COLUMNS = ("image_id", "noise", "text", "source_id", "detail", "scene")
PNG_COMPRESS_LEVEL = 6
_MAX_REDRAWS = 1000  # draws per held-out image before the world is declared too small


@dataclass(frozen=True)
class SynthSummary:
    """What `run` wrote: where, from which seed, how many images/texts, the noise counts."""

    out: Path
    seed: int
    n_human: int
    n_human_captions: int
    n_web: int
    n_test: int
    noise: dict[str, int]
    seconds: float
    test_redrawn: int = 0  # test draws that repeated a human, web or earlier test image

    def describe(self) -> str:
        mix = ", ".join(f"{k} {v}" for k, v in self.noise.items())
        return (
            f"synthetic corpus (seed {self.seed}) written to {self.out} in {self.seconds:.1f}s\n"
            f"  human: {self.n_human} images, {self.n_human_captions} captions\n"
            f"  web:   {self.n_web} images, one text each ({mix})\n"
            f"  test:  {self.n_test} images with reference captions, none repeating a human, web "
            f"or other test image ({self.test_redrawn} repeated draws redrawn)"
        )


def noise_quota(mix: NoiseMix, n: int) -> dict[str, int]:
    """Exact counts per noise kind summing to n (largest remainder, ties in kind order)."""
    shares = {k: getattr(mix, k) * n for k in NOISE_KINDS}
    counts = {k: int(np.floor(v)) for k, v in shares.items()}
    order = sorted(NOISE_KINDS, key=lambda k: (counts[k] - shares[k], NOISE_KINDS.index(k)))
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _rngs(seed: int, split: str) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for a split's scenes and its texts."""
    tag = _SPLITS[split]
    return np.random.default_rng([seed, tag, 0]), np.random.default_rng([seed, tag, 1])


def _dump_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n", "utf-8")


def _draw_split(
    cfg: SynthConfig,
    split: str,
    n: int,
    rng: np.random.Generator,
    root: Path,
    seen: set[bytes],
    held_out: bool = False,
    colours: dict[str, tuple[str, ...]] | None = None,
) -> tuple[list[str], list[Scene], int]:
    """Sample n scenes and write their PNGs under root/images, adding each image's pixel digest to
    `seen`; with `held_out`, a scene whose image is already in `seen` is drawn again; `colours`
    restricts each shape's colours (None: any). Returns
    (ids, scenes, how many draws were redrawn)."""
    images = root / "images"
    images.mkdir(parents=True)
    ids: list[str] = []
    scenes: list[Scene] = []
    redrawn = 0
    for i in range(n):
        for _ in range(_MAX_REDRAWS):
            scene = sample_scene(
                rng, cfg.image_size, cfg.max_objects, cfg.duplicate_prob, cfg.jitter,
                cfg.backgrounds, colours,
            )  # fmt: skip
            image = draw_scene(scene, cfg.image_size)
            digest = hashlib.sha256(image.tobytes()).digest()
            if not (held_out and digest in seen):
                break
            redrawn += 1
        else:
            raise CapfiltError(
                f"synth: found only {i} of {n} {split} images unlike every human, web and "
                f"earlier test image in {_MAX_REDRAWS} draws for the next one; the world is too "
                "small for synth.n_test: lower it, or raise synth.max_objects or synth.jitter"
            )
        seen.add(digest)
        image_id = f"{split}_{i:06d}"
        image.save(images / f"{image_id}.png", format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        ids.append(image_id)
        scenes.append(scene)
    return ids, scenes, redrawn


def _write_scenes_jsonl(ids: list[str], scenes: list[Scene], path: Path) -> None:
    lines = [
        json.dumps({"image_id": i, "scene": s.to_dict()}, sort_keys=True, separators=(",", ":"))
        for i, s in zip(ids, scenes, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_human(cfg: SynthConfig, root: Path, seen: set[bytes]) -> int:
    scene_rng, text_rng = _rngs(cfg.seed, "human")
    per_shape = cfg.human_colours_per_shape
    # None when all five: colours_per_shape(5) lists them rotated, which would change the draws
    colours = None if per_shape == len(COLOURS) else colours_per_shape(per_shape)
    ids, scenes, _ = _draw_split(cfg, "human", cfg.n_human, scene_rng, root, seen, colours=colours)
    images, annotations = [], []
    for k, (image_id, scene) in enumerate(zip(ids, scenes, strict=True)):
        images.append(
            {"id": k, "file_name": f"{image_id}.png", "width": cfg.image_size,
             "height": cfg.image_size}  # fmt: skip
        )
        for caption in human_captions(scene, cfg.captions_per_image, text_rng):
            annotations.append({"id": len(annotations), "image_id": k, "caption": caption})
    _dump_json({"images": images, "annotations": annotations}, root / "annotations.json")
    _write_scenes_jsonl(ids, scenes, root / "scenes.jsonl")
    return len(annotations)


def _write_test(cfg: SynthConfig, root: Path, seen: set[bytes]) -> int:
    """Write the held-out test split; return how many of its draws were redrawn."""
    scene_rng, text_rng = _rngs(cfg.seed, "test")
    ids, scenes, redrawn = _draw_split(
        cfg, "test", cfg.n_test, scene_rng, root, seen, held_out=True
    )
    rows = [
        {"image": f"images/{i}.png", "caption": human_captions(s, cfg.captions_per_image, text_rng)}
        for i, s in zip(ids, scenes, strict=True)
    ]
    _dump_json(rows, root / "test.json")
    _write_scenes_jsonl(ids, scenes, root / "scenes.jsonl")
    return redrawn


def _other_image_source(
    i: int,
    scenes: list[Scene],
    base: list[list[Mention]],
    pool: list[int],
    rng: np.random.Generator,
) -> int:
    """Another image whose (correct) text is false of image i."""
    for _ in range(100):
        j = pool[int(rng.integers(len(pool)))]
        if j != i and not is_consistent(specs_of(base[j]), scenes[i]):
            return j
    for j in pool:  # tiny corpora: take the first that works
        if j != i and not is_consistent(specs_of(base[j]), scenes[i]):
            return j
    raise CapfiltError(
        f"synth.n_web={len(scenes)} is too small to draw other_image texts; raise it "
        "or set synth.noise.other_image to 0"
    )


def _web_rows(
    cfg: SynthConfig, ids: list[str], scenes: list[Scene], rng: np.random.Generator
) -> list[tuple[str, ...]]:
    """One row per web image: (image_id, noise, text, source_id, detail, scene)."""
    n = len(ids)
    kinds = [k for k, c in noise_quota(cfg.noise, n).items() for _ in range(c)]
    kinds = [kinds[int(p)] for p in rng.permutation(n)]
    base = [web_mentions(s, rng) for s in scenes]
    base_text = [render_web(m, rng) for m in base]
    correct = [i for i, k in enumerate(kinds) if k == "correct"]
    pool = correct if len(correct) > 1 else list(range(n))
    rows = []
    for i, (kind, scene) in enumerate(zip(kinds, scenes, strict=True)):
        text, source, detail = base_text[i], "", ""
        if kind == "wrong_attribute":
            mentions, detail = wrong_attribute(scene, rng)
            text = render_web(mentions, rng)
        elif kind == "other_image":
            j = _other_image_source(i, scenes, base, pool, rng)
            text, source = base_text[j], ids[j]
        elif kind == "junk":
            text = junk_text(rng)
        rows.append((ids[i], kind, text, source, detail, scene.to_json()))
    return rows


def _write_web(cfg: SynthConfig, root: Path, seen: set[bytes]) -> dict[str, int]:
    scene_rng, text_rng = _rngs(cfg.seed, "web")
    ids, scenes, _ = _draw_split(cfg, "web", cfg.n_web, scene_rng, root, seen)
    rows = _web_rows(cfg, ids, scenes, text_rng)
    _dump_json([{"image": f"images/{r[0]}.png", "caption": r[2]} for r in rows], root / "web.json")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_TRUTH_COLUMNS)
    writer.writerows(rows)
    (root / "truth.csv").write_text(buf.getvalue(), encoding="utf-8")
    counts = Counter(r[1] for r in rows)
    return {k: counts.get(k, 0) for k in NOISE_KINDS}


def _check_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise CapfiltError(f"{out} already exists and is not empty; remove it first")


def run(cfg: SynthConfig, out: Path) -> SynthSummary:
    """Draw the corpus described by `cfg` into `out` (which must not exist or be empty)."""
    out = Path(out)
    _check_out(out)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        seen: set[bytes] = set()  # pixel digests of every image written so far
        n_captions = _write_human(cfg, tmp / "human", seen)
        noise = _write_web(cfg, tmp / "web", seen)
        redrawn = _write_test(cfg, tmp / "test", seen)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = SynthSummary(
        out=out, seed=cfg.seed, n_human=cfg.n_human, n_human_captions=n_captions,
        n_web=cfg.n_web, n_test=cfg.n_test, noise=noise,
        seconds=time.perf_counter() - start, test_redrawn=redrawn,
    )  # fmt: skip
    log.info("synth: %d + %d + %d images in %.1fs", cfg.n_human, cfg.n_web, cfg.n_test,
             summary.seconds)  # fmt: skip
    return summary
