"""The text side of the embedded corpus: a small template grammar and the web-noise generator.

Human captions name every object with all its attributes and vary only their wording: the
order of objects, a prefix ("a picture of", "there is"), position phrases ("at the top left",
"in the upper left", "on the left" for a pair), relations ("below it") and position-first
clauses. Identical objects (same shape, colour and size) are counted ("two red rings").
Web texts imitate alt-text: `correct` ones are short and partial but true; `wrong_attribute`
ones are a correct text with one attribute of one object swapped (mostly colour or shape) so
that it is false; `other_image` ones are another image's correct text, checked to be false of
this one; `junk` ones are file names and shop boilerplate. Every choice comes from the numpy
generator that is passed in, so the text is a pure function of the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from components.synth_world import (
    CELLS,
    COLOURS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    is_consistent,
    neighbour,
)

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {"ring": "rings", "square": "squares", "triangle": "triangles",
           "cross": "crosses", "bar": "bars"}  # fmt: skip
_UPPER = {"top": "upper", "bottom": "lower"}
_RELATIONS = {"up": ("above it",), "down": ("below it", "under it"),
              "left": ("to its left", "to the left of it"),
              "right": ("to its right", "to the right of it")}  # fmt: skip
_HUMAN_PREFIXES = ("", "", "a picture of ", "an image of ", "a photo of ", "there is ",
                   "this image shows ", "we can see ")  # fmt: skip
_WEB_PREFIXES = ("", "", "", "photo of ", "picture of ", "image of ", "stock photo of ",
                 "illustration of ", "close-up of ")  # fmt: skip
_WEB_SUFFIXES = ("", "", "", "", " icon", " clipart", " for sale", " - stock image",
                 " on display", " wallpaper", " png")  # fmt: skip
_JUNK_PHRASES = ("free shipping on all orders", "click to enlarge", "stock photo",
                 "image not available", "view larger image", "add to cart",
                 "best price guaranteed", "new arrivals", "loading...", "thumbnail",
                 "untitled", "sale 50% off today only", "click here to zoom", "sold out",
                 "no image", "placeholder", "copyright all rights reserved",
                 "subscribe to our newsletter", "limited edition", "in stock now")  # fmt: skip
MAX_WORDS = 25
# How a position-first clause starts (no prefix before it, no "with" joining it).
_POSITION_FIRST = ("at ", "in ", "on ", "along ", "to ", "above ", "below ", "under ")


@dataclass(frozen=True)
class Mention:
    """One group of identical objects as a text names it; None = left unsaid."""

    shape: str
    count: int = 1
    colour: str | None = None
    size: str | None = None
    positions: tuple[str, ...] = ()  # empty: position not said

    def specs(self) -> list[ObjectSpec]:
        pos = list(self.positions) + [None] * (self.count - len(self.positions))
        return [ObjectSpec(self.shape, self.colour, self.size, p) for p in pos]


def specs_of(mentions: Sequence[Mention]) -> list[ObjectSpec]:
    return [s for m in mentions for s in m.specs()]


def group_objects(scene: Scene) -> list[Mention]:
    """The scene as fully specified mentions, identical objects grouped, in cell order."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for o in scene.objects:
        groups.setdefault(o.kind, []).append(o.position)
    return [
        Mention(shape=k[0], colour=k[1], size=k[2], count=len(p), positions=tuple(p))
        for k, p in groups.items()
    ]


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(m: Mention, rng: np.random.Generator, bare_ok: bool = False) -> str:
    """ "a large red ring", "two small blue squares", "red ring" (bare, web only)."""
    if m.count > 1:
        det = NUMBER_WORDS.get(m.count, str(m.count))
    else:
        det = _choice(rng, ("", "a") if bare_ok else ("a", "a", "one"))
    words = [det, m.size or "", m.colour or "", PLURALS[m.shape] if m.count > 1 else m.shape]
    return " ".join(w for w in words if w)


def _cell_phrase(cell: str, rng: np.random.Generator) -> str:
    row, col = cell.split()
    return _choice(
        rng, (f"at the {row} {col}", f"in the {row} {col} corner", f"in the {_UPPER[row]} {col}")
    )


def position_phrase(cells: Sequence[str], rng: np.random.Generator) -> str:
    """Words that place a group: one cell, a shared row/column, or a list of cells."""
    if len(cells) == 1:
        return _cell_phrase(cells[0], rng)
    rows = {c.split()[0] for c in cells}
    cols = {c.split()[1] for c in cells}
    if len(cells) == 2 and len(rows) == 1:
        row = rows.pop()
        return _choice(rng, (f"at the {row}", f"along the {row}"))
    if len(cells) == 2 and len(cols) == 1:
        col = cols.pop()
        return _choice(rng, (f"on the {col}", f"on the {col} side"))
    named = [f"the {c}" for c in cells]
    return "at " + ", ".join(named[:-1]) + " and " + named[-1]


def _join(clauses: Sequence[str], rng: np.random.Generator) -> str:
    if len(clauses) == 1:
        return clauses[0]
    style = int(rng.integers(3))
    if style == 2 and clauses[-1].startswith(_POSITION_FIRST):
        style = 0  # "with at the top left ..." reads badly
    if style == 0:
        return ", ".join(clauses[:-1]) + " and " + clauses[-1]
    if style == 1:
        return " and ".join(clauses)
    return ", ".join(clauses[:-1]) + " with " + clauses[-1]


def _relation(prev: Mention | None, m: Mention, rng: np.random.Generator) -> str | None:
    """A relative position ("below it") when both are single objects in adjacent cells."""
    if prev is None or prev.count != 1 or m.count != 1 or rng.random() >= 0.35:
        return None
    for direction, phrases in _RELATIONS.items():
        if neighbour(prev.positions[0], direction) == m.positions[0]:
            return _choice(rng, phrases)
    return None


def _human_clause(m: Mention, prev: Mention | None, rng: np.random.Generator, first: bool) -> str:
    where = _relation(prev, m, rng) or position_phrase(m.positions, rng)
    what = noun_phrase(m, rng)
    if rng.random() < 0.25:  # position first
        there = "there are " if m.count > 1 else "there is "
        return f"{where} {there if first or rng.random() < 0.5 else ''}{what}"
    return f"{what} {where}"


def _one_human_caption(scene: Scene, rng: np.random.Generator) -> str:
    groups = group_objects(scene)
    order = [groups[int(i)] for i in rng.permutation(len(groups))]
    clauses, prev = [], None
    for i, m in enumerate(order):
        clauses.append(_human_clause(m, prev, rng, first=i == 0))
        prev = m
    body = _join(clauses, rng)
    if body.startswith(_POSITION_FIRST):
        return body
    prefix = _choice(rng, _HUMAN_PREFIXES)
    if prefix == "there is " and order[0].count > 1:
        prefix = "there are "
    return prefix + body


def _compact_caption(scene: Scene) -> str:
    """The shortest full description; used when every paraphrase drawn is too long."""
    parts = []
    for m in group_objects(scene):
        noun = f"{m.size} {m.colour} {PLURALS[m.shape] if m.count > 1 else m.shape}"
        det = NUMBER_WORDS[m.count] if m.count > 1 else "a"
        parts.append(f"{det} {noun} " + " ".join(m.positions))
    return ", ".join(parts)


def human_captions(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    """n distinct, fully correct paraphrases of the scene, each at most MAX_WORDS words."""
    out: list[str] = []
    for _ in range(200 * n):
        text = _one_human_caption(scene, rng)
        if len(text.split()) <= MAX_WORDS and text not in out:
            out.append(text)
            if len(out) == n:
                return out
    # Only reachable for very long scenes; pad with the compact form (may repeat).
    while len(out) < n:
        out.append(_compact_caption(scene))
    return out


def web_mentions(scene: Scene, rng: np.random.Generator) -> list[Mention]:
    """A partial but true selection of the scene, as alt-text tends to be."""
    groups = group_objects(scene)
    k = min(len(groups), 1 + int(rng.random() < 0.35) + int(rng.random() < 0.15))
    chosen = [groups[int(i)] for i in sorted(rng.permutation(len(groups))[:k])]
    out = []
    for m in chosen:
        keep_pos = m.count == 1 and rng.random() < 0.2
        out.append(
            Mention(
                shape=m.shape,
                count=m.count,
                colour=m.colour if rng.random() < 0.85 else None,
                size=m.size if rng.random() < 0.3 else None,
                positions=m.positions if keep_pos else (),
            )
        )
    return out


def render_web(mentions: Sequence[Mention], rng: np.random.Generator) -> str:
    """Alt-text wording of some mentions: optional prefix/suffix, bare nouns, varied joins."""
    parts = []
    for m in mentions:
        np_ = noun_phrase(m, rng, bare_ok=True)
        parts.append(f"{np_} {_cell_phrase(m.positions[0], rng)}" if m.positions else np_)
    joiner = _choice(rng, (" and ", ", ", " with "))
    text = _choice(rng, _WEB_PREFIXES) + joiner.join(parts) + _choice(rng, _WEB_SUFFIXES)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


def _swap_choices(m: Mention) -> list[tuple[str, float]]:
    options = [("colour", 0.45), ("shape", 0.45)] if m.colour else [("shape", 0.9)]
    if m.size:
        options.append(("size", 0.05))
    if m.positions:
        options.append(("position", 0.05))
    return options


def _swap(m: Mention, rng: np.random.Generator) -> tuple[Mention, str]:
    options = _swap_choices(m)
    weights = np.array([w for _, w in options])
    attr = options[int(rng.choice(len(options), p=weights / weights.sum()))][0]
    if attr == "position":
        old = m.positions[0]
        new = _choice(rng, [c for c in CELLS if c != old])
        return replace(m, positions=(new,)), f"position:{old}->{new}"
    vocab = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
    old = getattr(m, attr)
    new = _choice(rng, [v for v in vocab if v != old])
    return replace(m, **{attr: new}), f"{attr}:{old}->{new}"


def wrong_attribute(
    scene: Scene, rng: np.random.Generator, tries: int = 50
) -> tuple[list[Mention], str]:
    """A web selection with one attribute of one mention swapped so the text is false."""
    for _ in range(tries):
        mentions = web_mentions(scene, rng)
        i = int(rng.integers(len(mentions)))
        swapped, detail = _swap(mentions[i], rng)
        candidate = mentions[:i] + [swapped] + mentions[i + 1 :]
        if not is_consistent(specs_of(candidate), scene):
            return candidate, detail
    raise RuntimeError("could not corrupt a scene description; the world is too small")


def junk_text(rng: np.random.Generator) -> str:
    """A file name or shop/boilerplate phrase that says nothing about the image."""
    n = int(rng.integers(10**5))
    kind = int(rng.integers(6))
    if kind == 0:
        return f"IMG_{n % 10000:04d}.{_choice(rng, ('jpg', 'JPG', 'jpeg'))}"
    if kind == 1:
        return f"{_choice(rng, ('dsc', 'DSC', 'DSCN'))}{n:05d}.{_choice(rng, ('jpg', 'png'))}"
    if kind == 2:
        return f"{int(rng.integers(16**8)):08x}.{_choice(rng, ('webp', 'jpg', 'png'))}"
    if kind == 3:
        return f"product image {1 + n % 6} of {6 + n % 4}"
    phrase = _choice(rng, _JUNK_PHRASES)
    return phrase if kind == 4 else f"{phrase} | shop{n % 1000:03d}"
