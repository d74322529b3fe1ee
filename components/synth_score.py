"""Scoring captions against the embedded corpus's known ground truth.

`parse_caption` reads any caption in the world's vocabulary (the human paraphrase templates,
alt-text fragments, a generated "a picture of ..." caption) into described objects. Words
outside the vocabulary are skipped; number words, plurals, cell phrases ("top left", "upper
left ... corner"), row/column phrases for pairs ("at the top", "on the left") and relations
("below it", "to its right") are understood. Positions attach to the object they follow, or,
when that object is already placed, to the next object (position-first clauses). A bare plural
without a number means two. `score_captions` aligns the described objects with the true ones
(the alignment with most matching attributes) and reports per-attribute and strict accuracy.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.errors import CapfiltError
from components.synth_world import COLOURS, SHAPES, ObjectSpec, Scene, neighbour

_NUMBERS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4,
            "five": 5, "six": 6}  # fmt: skip
_SIZES = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_SHAPE_WORDS = {**{s: (s, False) for s in SHAPES},
                **{"rings": ("ring", True), "squares": ("square", True),
                   "triangles": ("triangle", True), "crosses": ("cross", True),
                   "bars": ("bar", True)}}  # fmt: skip
_ROWS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_BELOW = ("below", "under", "beneath", "underneath")
ATTRIBUTES = ("shape", "colour", "size", "position")
# How a true object's position is missed, after alignment: put in another object's cell (the
# caption names the right cells but binds objects to them wrongly), in an empty cell, or not placed
# at all (no position said, or no described object aligned with it)
PLACEMENT_ERRORS = ("other_object", "empty_cell", "unplaced")
# their metrics.json names: fractions of true objects (with position_accuracy they sum to 1)
PLACEMENT_KEYS = {e: f"position_{e}" for e in PLACEMENT_ERRORS}
_MAX_PARSED = 6  # described objects beyond this are ignored when aligning (all wrong anyway)


@dataclass(frozen=True)
class ParsedScene:
    """What a caption says: described objects, attributes None where unsaid."""

    objects: tuple[ObjectSpec, ...]


@dataclass
class _Group:
    shape: str
    count: int
    colour: str | None
    size: str | None
    positions: list[str | None] = field(default_factory=list)

    def need(self) -> int:
        return self.count - len(self.positions)


def _lex_position(tokens: list[str], i: int, last: str | None) -> tuple[list, int]:
    """Position items starting at tokens[i]: ([("cell", c)] | [("pair", c1, c2)], next i)."""
    t = tokens[i]
    nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
    if t in _ROWS:
        row = _ROWS[t]
        if nxt in ("left", "right"):
            return [("cell", f"{row} {nxt}")], i + 2
        return [("pair", f"{row} left", f"{row} right")], i + 1
    if t in ("left", "right"):
        relative = (i > 0 and tokens[i - 1] == "its") or tokens[i + 1 : i + 3] == ["of", "it"]
        if relative:
            return [("cell", neighbour(last, t) if last else None)], i + 1
        return [("pair", f"top {t}", f"bottom {t}")], i + 1
    if t in _BELOW + ("above",) and nxt == "it":
        direction = "up" if t == "above" else "down"
        return [("cell", neighbour(last, direction) if last else None)], i + 2
    return [], i + 1


def _lex(text: str) -> list[tuple]:
    """Caption → items: ("num", n), ("size", s), ("colour", c), ("shape", s, plural), places."""
    tokens = re.findall(r"[a-z]+", text.lower())
    items: list[tuple] = []
    last_cell: str | None = None
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in _NUMBERS:
            items.append(("num", _NUMBERS[t]))
        elif t in _SIZES:
            items.append(("size", _SIZES[t]))
        elif t in COLOURS:
            items.append(("colour", t))
        elif t in _SHAPE_WORDS:
            items.append(("shape", *_SHAPE_WORDS[t]))
        else:
            found, i = _lex_position(tokens, i, last_cell)
            for item in found:
                if item[0] == "cell":
                    last_cell = item[1]
            items.extend(found)
            continue
        i += 1
    return items


def _attach(group: _Group, item: tuple) -> None:
    if item[0] == "cell":
        group.positions.append(item[1])
    elif group.need() >= 2:
        group.positions.extend(item[1:])
    else:
        group.positions.append(None)  # a row/column cannot place a single object


def _assemble(items: list[tuple]) -> list[_Group]:
    groups: list[_Group] = []
    pending: dict[str, object] = {}
    waiting: list[tuple] = []  # positions said before their object
    for item in items:
        kind = item[0]
        if kind == "num":
            pending = {"count": item[1]}
        elif kind in ("size", "colour"):
            pending[kind] = item[1]
        elif kind == "shape":
            count = pending.get("count") or (2 if item[2] else 1)
            group = _Group(item[1], int(count), pending.get("colour"), pending.get("size"))
            pending = {}
            groups.append(group)
            for w in waiting:
                _attach(group, w)
            waiting = []
        elif groups and groups[-1].need() > 0:
            _attach(groups[-1], item)
        else:
            waiting.append(item)
    return groups


def parse_caption(text: str) -> ParsedScene | None:
    """The objects a caption describes, or None when it names no shape at all."""
    groups = _assemble(_lex(text))
    if not groups:
        return None
    objects = []
    for g in groups:
        cells = g.positions[: g.count] + [None] * max(0, g.need())
        objects += [ObjectSpec(g.shape, g.colour, g.size, c) for c in cells]
    return ParsedScene(objects=tuple(objects))


@dataclass(frozen=True)
class CaptionScore:
    """Accuracy of captions against their scenes.

    count: fraction of captions describing the true number of objects. shape, colour, size,
    position: fraction of true objects whose attribute the caption gets right, after aligning
    described and true objects one to one (the alignment with most matches). strict: fraction
    of captions describing exactly the scene (same multiset of fully specified objects).
    parsed: fraction of captions that name at least one shape.
    """

    n: int
    parsed: float
    count: float
    shape: float
    colour: float
    size: float
    position: float
    strict: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _best_alignment(truth: Scene, said: tuple[ObjectSpec, ...]) -> tuple[list[int], tuple[ObjectSpec | None, ...]]:
    """The one-to-one alignment of described to true objects with most matching attributes (the
    first found): per attribute how many true objects it gets right, and the described object (or
    None) of each."""
    said = said[:_MAX_PARSED]
    slots: list[ObjectSpec | None] = list(said) + [None] * max(0, len(truth.objects) - len(said))
    best, best_chosen = [0] * len(ATTRIBUTES), tuple(slots[: len(truth.objects)])
    for chosen in itertools.permutations(slots, len(truth.objects)):
        hits = [0] * len(ATTRIBUTES)
        for obj, spec in zip(truth.objects, chosen, strict=True):
            if spec is not None:
                for k, attr in enumerate(ATTRIBUTES):
                    hits[k] += getattr(spec, attr) == getattr(obj, attr)
        if sum(hits) > sum(best):
            best, best_chosen = hits, chosen
    return best, best_chosen


def _placement(true_cell: str, said_cell: str | None, occupied: set[str]) -> str | None:
    """Which of PLACEMENT_ERRORS a said cell makes of a true one (`occupied`: the scene's cells);
    None when it is right."""
    if said_cell is None:
        return "unplaced"
    if said_cell == true_cell:
        return None
    return "other_object" if said_cell in occupied else "empty_cell"


def _is_exact(truth: Scene, said: tuple[ObjectSpec, ...]) -> bool:
    want = sorted((o.shape, o.colour, o.size, o.position) for o in truth.objects)
    got = [(s.shape, s.colour, s.size, s.position) for s in said]
    return all(None not in g for g in got) and sorted(got) == want  # type: ignore[type-var]


@dataclass(frozen=True)
class CaptionHits:
    """One caption against its scene: true objects, per-attribute hits after alignment, exact,
    and per PLACEMENT_ERRORS how many true objects it places that way."""

    objects: int
    hits: tuple[int, ...]  # per ATTRIBUTES
    exact: bool
    parsed: bool
    count: bool
    misplaced: tuple[int, ...]  # per PLACEMENT_ERRORS
    pair_right: tuple[bool, ...] = ()  # per true object: shape and colour both said right


def caption_hits(truth: Scene, caption: str) -> CaptionHits:
    """Score one caption against its true scene (`score_captions` sums these)."""
    parsed = parse_caption(caption)
    n = len(truth.objects)
    if parsed is None:
        unplaced = tuple(n if e == "unplaced" else 0 for e in PLACEMENT_ERRORS)
        return CaptionHits(n, (0,) * len(ATTRIBUTES), False, False, False, unplaced, (False,) * n)
    hits, chosen = _best_alignment(truth, parsed.objects)
    occupied = {o.position for o in truth.objects}
    kinds = [_placement(o.position, s.position if s is not None else None, occupied)
             for o, s in zip(truth.objects, chosen, strict=True)]
    pair_right = tuple(s is not None and (s.shape, s.colour) == (o.shape, o.colour)
                       for o, s in zip(truth.objects, chosen, strict=True))
    return CaptionHits(n, tuple(hits), _is_exact(truth, parsed.objects), True, len(parsed.objects) == n,
                       tuple(kinds.count(e) for e in PLACEMENT_ERRORS), pair_right)


def split_pairs(truth: Scene, hits: CaptionHits, known: Collection[tuple[str, str]]) -> tuple[int, int, int, int]:
    """`hits.pair_right` split by `known` shape-colour pairs (those the human captions show):
    (objects with a known pair, of them named with both shape and colour right, objects with a
    novel pair, of them right)."""
    counts = [0, 0, 0, 0]
    for obj, right in zip(truth.objects, hits.pair_right, strict=True):
        at = 0 if (obj.shape, obj.colour) in known else 2
        counts[at] += 1
        counts[at + 1] += right
    return counts[0], counts[1], counts[2], counts[3]


def pair_hits(truth: Scene, caption: str, known: Collection[tuple[str, str]]) -> tuple[int, int, int, int]:
    """`split_pairs` of one caption against its scene, after `caption_hits`' alignment."""
    return split_pairs(truth, caption_hits(truth, caption), known)


def shape_colour_pairs(scenes: Iterable[Scene]) -> set[tuple[str, str]]:
    """Every (shape, colour) pair some object of `scenes` has."""
    return {(o.shape, o.colour) for s in scenes for o in s.objects}


def scene_of(scenes: Mapping[str, Scene], key: str) -> Scene:
    """The true scene of an image id, or of a path whose stem is the id."""
    image_id = Path(key).stem
    if image_id not in scenes:
        raise CapfiltError(f"caption for {key!r}: no ground-truth scene for {image_id!r}")
    return scenes[image_id]


def score_captions(
    scenes: Mapping[str, Scene], pairs: Iterable[tuple[str, str]]
) -> CaptionScore:
    """Score (image id or path whose stem is the id, caption) pairs against `scenes`."""
    scored = [caption_hits(scene_of(scenes, key), caption) for key, caption in pairs]
    if not scored:
        raise CapfiltError("no captions to score")
    n, n_objects = len(scored), sum(c.objects for c in scored)
    per_attr = {a: sum(c.hits[k] for c in scored) / n_objects for k, a in enumerate(ATTRIBUTES)}
    return CaptionScore(
        n=n, parsed=sum(c.parsed for c in scored) / n, count=sum(c.count for c in scored) / n,
        strict=sum(c.exact for c in scored) / n, **per_attr
    )


def _read_jsonl(path: Path) -> dict[str, Scene]:
    scenes = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
            scenes[row["image_id"]] = Scene.from_dict(row["scene"], where)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CapfiltError(f"{where}: not a scene row ({exc})") from None
    return scenes


def _read_truth_csv(path: Path) -> dict[str, Scene]:
    scenes = {}
    with path.open(encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            where = f"{path}:{lineno}"
            try:
                scenes[row["image_id"]] = Scene.from_dict(json.loads(row["scene"]), where)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CapfiltError(f"{where}: not a truth row ({exc})") from None
    return scenes


def load_scenes(split_dir: Path) -> dict[str, Scene]:
    """Ground-truth scenes of a split folder: `scenes.jsonl` (human, test) or `truth.csv` (web)."""
    split_dir = Path(split_dir)
    if (split_dir / "scenes.jsonl").is_file():
        return _read_jsonl(split_dir / "scenes.jsonl")
    if (split_dir / "truth.csv").is_file():
        return _read_truth_csv(split_dir / "truth.csv")
    raise CapfiltError(f"{split_dir}: no scenes.jsonl or truth.csv (not a synth split folder?)")
