"""The world of the embedded corpus: its vocabulary, its scenes and how they are drawn.

A scene is a plain background with 1 to 4 objects; each object has a shape, a colour, a size
(small/large) and a position on a 2×2 grid of quadrants. The grid is chosen so that each
quadrant covers exactly 2×2 patches of a 64×64 image cut into 16-pixel patches (a 4×4 token
grid), and an object sits at its quadrant's centre (moved by at most `jitter` pixels), so
position and shape are read from a fixed set of tokens and objects never overlap. A probe (a
4-layer, width-128 ViT classifying each quadrant, 1500 steps) learned shapes far better with
objects held near the centre (0.7-1.0 accuracy at 0-2 px jitter) than anywhere in the quadrant
(0.4-0.5 at 4-8 px). The five shapes (ring, square, triangle, cross, bar)
were picked for silhouettes that differ strongly even at 12 pixels: hollow, boxy, pointed,
plus-shaped and elongated (no two overlap by more than ~60% IoU; a filled circle was dropped
because it covers 78% of a square). Their areas differ too, which only helps a tiny model.
Colours are saturated and far apart in RGB, and visible on every background (black, grey,
white). The background is a nuisance variable and is never mentioned in text; the default world
uses black only (`synth.backgrounds`): with three backgrounds, the image features of a
from-scratch ViT are dominated by the background, which no caption mentions, and image-text
contrastive learning sat at chance (in-batch loss ln 32) for ~300 steps; with each image's
background subtracted it left chance within 50–100 steps (tiny preset, batch 32, lr 5e-4). Drawing uses
Pillow's non-antialiased primitives on integer coordinates, so pixels depend only on the seed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from components.errors import CapfiltError

SHAPES = ("ring", "square", "triangle", "cross", "bar")
COLOURS = {
    "red": (230, 25, 25),
    "green": (20, 185, 40),
    "blue": (30, 80, 245),
    "yellow": (245, 225, 20),
    "purple": (175, 40, 230),
}
SIZES = ("small", "large")
BACKGROUNDS = {"black": (0, 0, 0), "grey": (128, 128, 128), "white": (255, 255, 255)}
# Quadrants in canonical (reading) order; (row, column) on the 2×2 grid.
CELLS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
MAX_OBJECTS = len(CELLS)
# Object extent in pixels for a 32-pixel quadrant (scaled with the image size).
_EXTENT = {"small": (12, 15), "large": (24, 28)}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its attributes and its pixel box (top-left corner and side)."""

    shape: str
    colour: str
    size: str
    position: str  # one of CELLS
    x: int
    y: int
    extent: int

    @property
    def kind(self) -> tuple[str, str, str]:
        """What makes two objects "the same" for counting: shape, colour, size."""
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class Scene:
    """A whole image's ground truth; objects are in canonical cell order."""

    background: str
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "scene") -> Scene:
        """Parse a scene mapping; anything malformed is a CapfiltError naming `where`."""
        try:
            objects = tuple(SceneObject(**o) for o in raw["objects"])
            scene = cls(background=raw["background"], objects=objects)
        except (KeyError, TypeError) as exc:
            raise CapfiltError(f"{where}: not a valid scene ({exc})") from None
        for o in objects:
            if o.shape not in SHAPES or o.colour not in COLOURS or o.size not in SIZES:
                raise CapfiltError(f"{where}: unknown attribute in {o}")
            if o.position not in CELLS:
                raise CapfiltError(f"{where}: unknown position {o.position!r}")
        return scene


@dataclass(frozen=True)
class ObjectSpec:
    """An object as text describes it: any attribute may be unspecified (None)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def fits(self, obj: SceneObject) -> bool:
        """True when every attribute this spec names agrees with `obj`."""
        return all(
            want is None or want == have
            for want, have in (
                (self.shape, obj.shape),
                (self.colour, obj.colour),
                (self.size, obj.size),
                (self.position, obj.position),
            )
        )


def is_consistent(specs: Sequence[ObjectSpec], scene: Scene) -> bool:
    """True when each described object can be matched to its own distinct object of the scene.

    This is what "the text is true of the image" means for partial texts (alt-texts): nothing
    said is false, though much may be left unsaid.
    """
    if len(specs) > len(scene.objects):
        return False
    for chosen in itertools.permutations(scene.objects, len(specs)):
        if all(s.fits(o) for s, o in zip(specs, chosen, strict=True)):
            return True
    return False


def neighbour(cell: str, direction: str) -> str | None:
    """The cell one step `direction` (up/down/left/right) of `cell`, or None off the grid."""
    row, col = CELLS[cell]
    d_row, d_col = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}[direction]
    target = (row + d_row, col + d_col)
    return next((name for name, rc in CELLS.items() if rc == target), None)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def colours_per_shape(k: int) -> dict[str, tuple[str, ...]]:
    """The colours each shape may take when only k of the five are allowed per shape.

    Shape i gets colours i, i+1, ..., i+k-1 (mod 5), so every colour still goes with exactly k
    shapes and every shape and every colour stays equally common; k = 5 allows every pair.
    """
    if not 1 <= k <= len(COLOURS):
        raise CapfiltError(f"colours per shape must be 1 to {len(COLOURS)}, got {k}")
    names = list(COLOURS)
    return {
        shape: tuple(names[(i + j) % len(names)] for j in range(k))
        for i, shape in enumerate(SHAPES)
    }


def _object_kinds(
    rng: np.random.Generator,
    n: int,
    duplicate_prob: float,
    colours: dict[str, tuple[str, ...]] | None = None,
) -> list[tuple[str, str, str]]:
    """Attributes of n objects; each later object repeats an earlier one with duplicate_prob.
    `colours` maps each shape to the colours it may take (None: any)."""
    kinds: list[tuple[str, str, str]] = []
    for i in range(n):
        if i > 0 and rng.random() < duplicate_prob:
            kinds.append(kinds[int(rng.integers(i))])
        else:
            shape = _pick(rng, SHAPES)
            palette = list(COLOURS) if colours is None else list(colours[shape])
            kinds.append((shape, _pick(rng, palette), _pick(rng, SIZES)))
    return kinds


def _place(rng: np.random.Generator, start: int, quadrant: int, extent: int, jitter: int) -> int:
    """Top/left pixel of an object centred in its quadrant, shifted by up to ±jitter pixels."""
    free = (quadrant - extent) // 2
    slack = max(0, min(jitter, free - 1))  # keep a 1-pixel margin: neighbours never touch
    return start + free + int(rng.integers(-slack, slack + 1))


def sample_scene(
    rng: np.random.Generator,
    image_size: int,
    max_objects: int,
    duplicate_prob: float,
    jitter: int,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    colours: dict[str, tuple[str, ...]] | None = None,
) -> Scene:
    """Draw one scene: object count, distinct quadrants, attributes and jittered pixel boxes;
    `colours` restricts each shape's colours (see colours_per_shape; None: any)."""
    n = int(rng.integers(1, max_objects + 1))
    names = list(CELLS)
    cells = sorted(int(c) for c in rng.permutation(len(names))[:n])
    background = _pick(rng, list(backgrounds))
    quadrant = image_size // 2
    scale = quadrant / 32
    objects = []
    kinds = _object_kinds(rng, n, duplicate_prob, colours)
    for cell, (shape, colour, size) in zip(cells, kinds):
        lo, hi = (round(v * scale) for v in _EXTENT[size])
        extent = int(rng.integers(lo, hi + 1))
        row, col = CELLS[names[cell]]
        x = _place(rng, col * quadrant, quadrant, extent, jitter)
        y = _place(rng, row * quadrant, quadrant, extent, jitter)
        objects.append(SceneObject(shape, colour, size, names[cell], x, y, extent))
    return Scene(background=background, objects=tuple(objects))


def _draw_object(
    draw: ImageDraw.ImageDraw, o: SceneObject, background: tuple[int, int, int]
) -> None:
    x, y, e = o.x, o.y, o.extent
    fill = COLOURS[o.colour]
    thick = max(2, round(e / 3))
    mid = (e - thick) // 2
    if o.shape == "ring":
        # A hollow disc: unlike a filled circle, it cannot be mistaken for a square at 12 px.
        hole = max(2, round(e / 4))
        draw.ellipse([x, y, x + e - 1, y + e - 1], fill=fill)
        draw.ellipse([x + hole, y + hole, x + e - 1 - hole, y + e - 1 - hole], fill=background)
    elif o.shape == "square":
        draw.rectangle([x, y, x + e - 1, y + e - 1], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x + (e - 1) // 2, y), (x, y + e - 1), (x + e - 1, y + e - 1)], fill=fill)
    elif o.shape == "cross":
        draw.rectangle([x, y + mid, x + e - 1, y + mid + thick - 1], fill=fill)
        draw.rectangle([x + mid, y, x + mid + thick - 1, y + e - 1], fill=fill)
    elif o.shape == "bar":
        draw.rectangle([x, y + mid, x + e - 1, y + mid + thick - 1], fill=fill)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(f"no drawing for shape {o.shape!r}")


def draw_scene(scene: Scene, image_size: int) -> Image.Image:
    """Render a scene as an RGB image (no antialiasing: same pixels everywhere)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_object(draw, o, BACKGROUNDS[scene.background])
    return image
