"""A contact sheet of the embedded corpus: sample images with their texts, for a human to look at.

The sheet shows the first human images with one of their captions and the first web images with
their alt-text and its noise kind, each image enlarged with nearest-neighbour sampling so single
pixels stay visible. It is written outside the corpus folder (whose hash is pinned), atomically.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from components.errors import CapfiltError

_ZOOM = 3
_TEXT_LINES = 5
_WRAP = 30


def check_preview_path(preview: Path, corpus: Path) -> None:
    """Refuse a preview path inside the corpus folder or without a .png suffix."""
    if Path(preview).suffix.lower() != ".png":
        raise CapfiltError(f"--preview {preview}: must be a .png file")
    if Path(preview).resolve().is_relative_to(Path(corpus).resolve()):
        raise CapfiltError(
            f"--preview {preview}: must be outside the corpus folder {corpus} (its hash is pinned)"
        )


def _samples(corpus: Path, n: int) -> list[tuple[Path, str]]:
    """(image path, label) pairs: half human captions, half web texts with their noise kind."""
    try:
        coco = json.loads((corpus / "human" / "annotations.json").read_text(encoding="utf-8"))
        with (corpus / "web" / "truth.csv").open(encoding="utf-8", newline="") as f:
            truth = list(csv.DictReader(f))
    except (OSError, json.JSONDecodeError) as exc:
        raise CapfiltError(f"{corpus}: cannot read the corpus for a preview ({exc})") from None
    first_caption: dict[int, str] = {}
    for a in coco["annotations"]:
        first_caption.setdefault(a["image_id"], a["caption"])
    human = [
        (corpus / "human" / "images" / im["file_name"], f"[human] {first_caption[im['id']]}")
        for im in coco["images"][: n // 2]
    ]
    web = [
        (corpus / "web" / "images" / f"{r['image_id']}.png", f"[{r['noise']}] {r['text']}")
        for r in truth[: n - len(human)]
    ]
    return human + web


def write_preview(corpus: Path, dest: Path, n: int = 16, columns: int = 4) -> Path:
    """Draw n sample images with their texts into a PNG grid at `dest`; returns `dest`."""
    corpus, dest = Path(corpus), Path(dest)
    check_preview_path(dest, corpus)
    samples = _samples(corpus, n)
    side = Image.open(samples[0][0]).width * _ZOOM
    font = ImageFont.load_default(size=11)
    cell_w, cell_h = max(side, 200) + 8, side + 14 * _TEXT_LINES + 10
    rows = -(-len(samples) // columns)
    sheet = Image.new("RGB", (cell_w * columns, cell_h * rows), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (path, label) in enumerate(samples):
        x, y = (k % columns) * cell_w + 4, (k // columns) * cell_h + 4
        with Image.open(path) as im:
            sheet.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
        for line_no, line in enumerate(textwrap.wrap(label, _WRAP)[:_TEXT_LINES]):
            draw.text((x, y + side + 3 + 14 * line_no), line, fill=(0, 0, 0), font=font)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(dest)
    return dest
