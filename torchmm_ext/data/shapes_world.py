"""A deterministic synthetic "shapes world" written in ALBEF's JSON formats.

Every image shows 1-3 objects on a noisy, tinted background. An object is a shape, a colour,
a size and a cell of a 3x3 grid; within one image shapes, colours and cells are all distinct,
so "the circle" or "the red object" always names exactly one object. Captions are
compositional (they name every object's colour and shape plus its size and/or position), so
swapping two colours in a caption gives a fluent, false caption: a hard negative that
image-text matching must reject but that a bag-of-words match cannot.

The world is generated once per parameter set and cached on disk (see
:func:`generate_shapes_world` and :func:`default_shapes_root`). Layout of a generated root::

    root/
      manifest.json               parameters, format version, counts, file list
      images/{train,val,test}/NNNNNN.png
      retrieval_{train,val,test}.json, pretrain.json, pretrain_objects.json
      vqa_{train,val,test}.json, answer_list.json
      ve_{train,val,test}.json
      nlvr_{train,dev,test}.json
      grounding_{train,val,testA,testB}.json, grounding_dets.json, grounding_gt.json
      hard_negatives_test.json    test captions with their colour-swapped negative
      scenes.json                 ground truth (objects, boxes) per image
      vocab_corpus.txt            every text of the world, one per line

Image paths inside the JSON files are relative to ``root/images``. VE records store the image
id without extension (``"test/000012"``); ``image_root / (id + ".png")`` resolves it (ALBEF's
own VE reader appends ``.jpg``, ours takes the extension as an argument).
"""

import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "FORMAT_VERSION",
    "SHAPES",
    "COLOURS",
    "SIZES",
    "POSITIONS",
    "SceneObject",
    "Scene",
    "ShapesWorld",
    "sample_scene",
    "render_scene",
    "describe_scene",
    "swap_colours",
    "generate_shapes_world",
    "default_shapes_root",
    "cached_shapes_world",
]

PathLike = Union[str, Path]

# Bump whenever the generated content or layout changes: cached worlds are then regenerated.
FORMAT_VERSION = 1

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 195, 70),
    "blue": (60, 100, 245),
    "yellow": (240, 225, 55),
    "purple": (160, 65, 215),
    "orange": (250, 145, 35),
    "white": (238, 238, 238),
}
# Side of the object's bounding square as a fraction of the image side.
SIZES: Dict[str, float] = {"small": 0.17, "large": 0.28}
# Row-major names of the 3x3 grid cells.
POSITIONS: Tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
SPLITS: Tuple[str, ...] = ("train", "val", "test")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges for 10-pixel objects
_NOISE_STD = 10.0
_COLOUR_JITTER = 15
_MAX_OBJECTS = 3


class SceneObject(NamedTuple):
    """One object of a scene; coordinates are pixels of the rendered image."""

    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major on the 3x3 grid
    cx: float
    cy: float
    extent: float  # side of the square the shape is drawn in
    rgb: Tuple[int, int, int]

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def box(self) -> List[float]:
        """Tight bounding box ``[x, y, w, h]`` of the drawn shape."""
        if self.shape == "circle":
            r = self.extent / 2
            x0, y0, x1, y1 = self.cx - r, self.cy - r, self.cx + r, self.cy + r
        else:
            pts = _polygon(self.shape, self.cx, self.cy, self.extent)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        return [round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1)]


class Scene(NamedTuple):
    """A sampled image: its relative path, global id and content."""

    image: str  # path relative to the image root, e.g. "train/000003.png"
    image_id: int
    objects: Tuple[SceneObject, ...]
    background: Tuple[int, int, int]
    noise_seed: int


_FILE_FIELDS: Dict[str, str] = {
    "manifest": "manifest.json",
    "retrieval_train": "retrieval_train.json",
    "retrieval_val": "retrieval_val.json",
    "retrieval_test": "retrieval_test.json",
    "pretrain": "pretrain.json",
    "pretrain_objects": "pretrain_objects.json",
    "vqa_train": "vqa_train.json",
    "vqa_val": "vqa_val.json",
    "vqa_test": "vqa_test.json",
    "answer_list": "answer_list.json",
    "ve_train": "ve_train.json",
    "ve_val": "ve_val.json",
    "ve_test": "ve_test.json",
    "nlvr_train": "nlvr_train.json",
    "nlvr_dev": "nlvr_dev.json",
    "nlvr_test": "nlvr_test.json",
    "grounding_train": "grounding_train.json",
    "grounding_val": "grounding_val.json",
    "grounding_testA": "grounding_testA.json",
    "grounding_testB": "grounding_testB.json",
    "grounding_dets": "grounding_dets.json",
    "grounding_gt": "grounding_gt.json",
    "hard_negatives_test": "hard_negatives_test.json",
    "scenes": "scenes.json",
    "vocab_corpus": "vocab_corpus.txt",
}


class ShapesWorld(NamedTuple):
    """Paths of a generated shapes world. ``image_root`` is the root for JSON image paths."""

    root: Path
    image_root: Path
    params: Dict[str, Any]
    manifest: Path
    retrieval_train: Path
    retrieval_val: Path
    retrieval_test: Path
    pretrain: Path
    pretrain_objects: Path
    vqa_train: Path
    vqa_val: Path
    vqa_test: Path
    answer_list: Path
    ve_train: Path
    ve_val: Path
    ve_test: Path
    nlvr_train: Path
    nlvr_dev: Path
    nlvr_test: Path
    grounding_train: Path
    grounding_val: Path
    grounding_testA: Path
    grounding_testB: Path
    grounding_dets: Path
    grounding_gt: Path
    hard_negatives_test: Path
    scenes: Path
    vocab_corpus: Path

    @property
    def ve_image_ext(self) -> str:
        """Extension to append to VE image ids (``VEDataset(..., image_ext=world.ve_image_ext)``)."""
        return ".png"

    @property
    def pretrain_files(self) -> List[Path]:
        """The pre-training annotation files (list captions, then single-object str captions)."""
        return [self.pretrain, self.pretrain_objects]

    @classmethod
    def from_root(cls, root: PathLike, params: Dict[str, Any]) -> "ShapesWorld":
        root = Path(root)
        files = {field: root / name for field, name in _FILE_FIELDS.items()}
        return cls(root=root, image_root=root / "images", params=dict(params), **files)


# --------------------------------------------------------------------------------------
# Scene sampling and rendering
# --------------------------------------------------------------------------------------


def _rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    # String seeds go through SHA-512 in CPython: stable across processes and runs, and a
    # separate stream per purpose keeps e.g. captions unchanged when VQA templates change.
    return random.Random(f"shapes-world/{seed}/{split}/{index}/{purpose}")


def _int_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def sample_scene(rng: random.Random, image_size: int) -> Tuple[Tuple[SceneObject, ...], Tuple[int, int, int]]:
    """Sample the objects and background colour of one image.

    Args:
        rng (random.Random): per-image random stream.
        image_size (int): side of the square image in pixels.

    Returns:
        Tuple[Tuple[SceneObject, ...], Tuple[int, int, int]]: the objects (1 to 3, distinct
        shapes, colours and cells) and the background base colour.
    """
    num = rng.choices((1, 2, 3), weights=(0.2, 0.4, 0.4))[0]
    cells = rng.sample(range(9), num)
    shapes = rng.sample(SHAPES, num)
    colours = rng.sample(list(COLOURS), num)
    cell_side = image_size / 3
    objects = []
    for cell, shape, colour in zip(cells, shapes, colours):
        size = rng.choice(tuple(SIZES))
        extent = SIZES[size] * image_size * rng.uniform(0.95, 1.05)
        # Jitter inside the cell but never across its border, so objects cannot overlap.
        slack = max(0.0, (cell_side - extent) / 2) * 0.8
        cx = (cell % 3 + 0.5) * cell_side + rng.uniform(-slack, slack)
        cy = (cell // 3 + 0.5) * cell_side + rng.uniform(-slack, slack)
        base = COLOURS[colour]
        rgb = tuple(min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in base)
        objects.append(SceneObject(shape, colour, size, cell, cx, cy, extent, rgb))  # type: ignore[arg-type]
    grey = rng.randint(25, 110)
    background = tuple(min(255, max(0, grey + rng.randint(-18, 18))) for _ in range(3))
    return tuple(objects), background  # type: ignore[return-value]


def _polygon(shape: str, cx: float, cy: float, extent: float) -> List[Tuple[float, float]]:
    h = extent / 2
    if shape == "square":
        s = h * 0.86  # a full-extent square looks much bigger than the circle of the same extent
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        t = h / 3
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
            (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
            (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    if shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw a scene: anti-aliased shapes on the background, then per-pixel gaussian noise.

    Args:
        scene (Scene): the scene to draw.
        image_size (int): side of the output image in pixels.

    Returns:
        PIL.Image.Image: an RGB image of size ``image_size x image_size``.
    """
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * s, image_size * s), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        if obj.shape == "circle":
            r = obj.extent / 2
            draw.ellipse([(obj.cx - r) * s, (obj.cy - r) * s, (obj.cx + r) * s, (obj.cy + r) * s], fill=obj.rgb)
        else:
            pts = _polygon(obj.shape, obj.cx, obj.cy, obj.extent)
            draw.polygon([(x * s, y * s) for x, y in pts], fill=obj.rgb)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, _NOISE_STD, (image_size, image_size, 3))
    pixels = np.clip(np.asarray(small, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# --------------------------------------------------------------------------------------
# Language: captions, hard negatives, questions, statements, referring expressions
# --------------------------------------------------------------------------------------

_ARTICLE = re.compile(r"\b(a|an) (\w)")
_COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def _fix_articles(text: str) -> str:
    return _ARTICLE.sub(lambda m: ("an " if m.group(2) in "aeiou" else "a ") + m.group(2), text)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _position_phrase(cell: int, rng: random.Random) -> str:
    name = POSITIONS[cell]
    if name == "center":
        return rng.choice(("in the center", "in the middle"))
    if " " in name:  # a corner
        return rng.choice((f"at the {name}", f"in the {name}", f"in the {name} corner"))
    if name in ("top", "bottom"):
        return rng.choice((f"at the {name}", f"near the {name}"))
    return rng.choice((f"on the {name}", f"at the {name}"))


def _object_phrase(obj: SceneObject, rng: random.Random, detail: str, article: str = "a") -> str:
    """``detail``: "size", "position" or "both" - what is said besides colour and shape."""
    words = [article] if article else []
    if detail in ("size", "both"):
        words.append(obj.size)
    words += [obj.colour, obj.shape]
    if detail in ("position", "both"):
        words.append(_position_phrase(obj.cell, rng))
    return " ".join(words)


def _detail(rng: random.Random) -> str:
    return rng.choices(("both", "position", "size"), weights=(0.5, 0.3, 0.2))[0]


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b`` (rows win over columns)."""
    if a.row != b.row:
        return "above" if a.row < b.row else "below"
    return "to the left of" if a.col < b.col else "to the right of"


_OPPOSITE = {"above": "below", "below": "above", "to the left of": "to the right of", "to the right of": "to the left of"}


def describe_scene(objects: Sequence[SceneObject], rng: random.Random) -> str:
    """One compositional caption naming every object's colour and shape, plus its size and/or
    position (absolute, or relative to another object).

    Args:
        objects (Sequence[SceneObject]): the scene's objects.
        rng (random.Random): picks object order, template and wording.

    Returns:
        str: a lower-case caption without punctuation other than commas.
    """
    objs = list(objects)
    rng.shuffle(objs)
    n = len(objs)
    families = ["list", "there", "count", "image"] + (["relation"] * 2 if n >= 2 else ["one"])
    family = rng.choice(families)
    if family == "relation":
        a, b = objs[0], objs[1]
        pa = _object_phrase(a, rng, "size" if rng.random() < 0.5 else "", "a")
        pb = _object_phrase(b, rng, "size" if rng.random() < 0.5 else "", "a")
        text = f"{pa} {_relation(a, b)} {pb}"
        if n == 3:
            text += " and " + _object_phrase(objs[2], rng, _detail(rng))
    elif family == "one":  # single object, e.g. "one small green triangle on the right"
        text = _object_phrase(objs[0], rng, "both", article="one")
    else:
        phrases = [_object_phrase(o, rng, _detail(rng)) for o in objs]
        if family == "list":
            text = _join(phrases)
        elif family == "there":
            text = "there is " + _join(phrases)
        elif family == "count":
            noun = "object" if n == 1 else "objects"
            text = f"{NUMBER_WORDS[n]} {noun}, {_join(phrases)}"
        else:
            text = rng.choice(("an image of ", "a picture with ", "a dark background with ")) + _join(phrases)
    return _fix_articles(text)


def swap_colours(caption: str, rng: Optional[random.Random] = None) -> Optional[str]:
    """Swap two colour words of a caption: a fluent hard negative for a multi-object image.

    Every occurrence of the two colours is exchanged and articles are fixed ("a red" <->
    "an orange"). Since colours are distinct within a shapes-world image, the result always
    describes a different scene than the original caption.

    Args:
        caption (str): a caption mentioning at least two different colours.
        rng (Optional[random.Random]): picks which two colours to swap; ``None`` swaps the
            first two that appear.

    Returns:
        Optional[str]: the negative caption, or ``None`` if fewer than two colours appear.
    """
    found = list(dict.fromkeys(_COLOUR_WORD.findall(caption)))
    if len(found) < 2:
        return None
    a, b = rng.sample(found, 2) if rng is not None else found[:2]
    swapped = _COLOUR_WORD.sub(lambda m: b if m.group(1) == a else a if m.group(1) == b else m.group(1), caption)
    return _fix_articles(swapped)


def _captions(scene: Scene, rng: random.Random, k: int) -> List[str]:
    captions: List[str] = []
    for _ in range(k * 20):  # distinct captions per image; give up on duplicates eventually
        text = describe_scene(scene.objects, rng)
        if text not in captions:
            captions.append(text)
        if len(captions) == k:
            break
    while len(captions) < k:
        captions.append(describe_scene(scene.objects, rng))
    return captions


def _vqa_questions(scene: Scene, rng: random.Random, num: int) -> List[Tuple[str, str, Tuple[str, ...]]]:
    """``num`` questions of distinct types: ``(question, answer, candidate answers of that type)``."""
    objs = scene.objects
    colours, shapes, sizes = tuple(COLOURS), SHAPES, tuple(SIZES)
    counts = tuple(str(i) for i in range(1, _MAX_OBJECTS + 1))

    def color_of_shape():
        o = rng.choice(objs)
        return f"what color is the {o.shape}", o.colour, colours

    def shape_of_colour():
        o = rng.choice(objs)
        return f"what shape is the {o.colour} object", o.shape, shapes

    def count():
        return rng.choice(("how many objects are there", "how many shapes are in the picture")), str(len(objs)), counts

    def exists():
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            o = rng.choice(objs)
            c, s = o.colour, o.shape
        else:  # mostly near misses: a present shape in another colour, or a present colour
            while True:
                o = rng.choice(objs)
                c = rng.choice(colours) if rng.random() < 0.5 else o.colour
                s = o.shape if c != o.colour else rng.choice(shapes)
                if (c, s) not in present:
                    break
        return f"is there a {c} {s}", "yes" if (c, s) in present else "no", ("yes", "no")

    def shape_at():
        o = rng.choice(objs)
        return f"what shape is {_position_phrase(o.cell, rng)}", o.shape, shapes

    def colour_at():
        o = rng.choice(objs)
        return f"what color is the object {_position_phrase(o.cell, rng)}", o.colour, colours

    def where():
        o = rng.choice(objs)
        return f"where is the {o.colour} {o.shape}", o.position, POSITIONS

    def size_of():
        o = rng.choice(objs)
        return f"is the {o.shape} large or small", o.size, sizes

    makers = [color_of_shape, shape_of_colour, count, exists, shape_at, colour_at, where, size_of]
    return [(_fix_articles(q), a, c) for q, a, c in (make() for make in rng.sample(makers, num))]


def _noisy_answers(answer: str, candidates: Sequence[str], rng: random.Random, num: int = 10) -> List[str]:
    """Ten annotator answers, each wrong with probability 0.12 (like real VQA's disagreement)."""
    wrong = [c for c in candidates if c != answer]
    return [rng.choice(wrong) if wrong and rng.random() < 0.12 else answer for _ in range(num)]


def _ve_statements(scene: Scene, rng: random.Random) -> List[Tuple[str, str]]:
    """One entailed, one contradicted and one neutral statement, in random order."""
    objs = scene.objects
    n = len(objs)
    o = rng.choice(objs)
    present = {(x.colour, x.shape) for x in objs}

    def absent_object() -> str:
        while True:
            c, s = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
            if (c, s) not in present:
                return f"there is a {c} {s}"

    entail = [
        lambda: describe_scene(objs, rng),
        lambda: f"there is a {o.size} {o.colour} {o.shape}",
        lambda: f"the {o.shape} is {o.colour}",
        lambda: f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'}",
    ]
    contra = [
        absent_object,
        lambda: f"the {o.shape} is {rng.choice([c for c in COLOURS if c != o.colour])}",
        lambda: f"there are {NUMBER_WORDS[rng.choice([m for m in range(1, _MAX_OBJECTS + 2) if m != n])]} objects",
        lambda: f"the {o.colour} {o.shape} is {'small' if o.size == 'large' else 'large'}",
    ]
    if n >= 2:
        a, b = rng.sample(objs, 2)
        entail.append(lambda: f"the {a.colour} {a.shape} is {_relation(a, b)} the {b.colour} {b.shape}")
        contra.append(lambda: f"the {a.colour} {a.shape} is {_OPPOSITE[_relation(a, b)]} the {b.colour} {b.shape}")
        contra.append(lambda: swap_colours(describe_scene(objs, rng), rng) or absent_object())
    materials = ("wood", "metal", "glass", "plastic", "paper", "stone")
    textures = ("shiny", "striped", "dotted", "rough", "soft", "wet")
    neutral = [
        lambda: f"the {o.colour} {o.shape} is made of {rng.choice(materials)}",
        lambda: f"the {o.colour} {o.shape} is {rng.choice(textures)}",
        lambda: f"something is hidden behind the {o.colour} {o.shape}",
        lambda: f"the {o.shape} was drawn by a child",
        lambda: f"the {o.colour} {o.shape} is moving to the {rng.choice(('left', 'right'))}",
    ]
    out = [(_fix_articles(rng.choice(entail)()), "entailment"), (_fix_articles(rng.choice(contra)()), "contradiction")]
    out.append((_fix_articles(rng.choice(neutral)()), "neutral"))
    rng.shuffle(out)
    return out


def _nlvr_statement(left: Scene, right: Scene, rng: random.Random) -> Tuple[str, str]:
    """A statement about an image pair and its truth ("True"/"False"), labels balanced."""

    def has(scene: Scene, thing: Tuple[Optional[str], Optional[str]]) -> bool:
        c, s = thing
        return any((c is None or o.colour == c) and (s is None or o.shape == s) for o in scene.objects)

    def name(thing: Tuple[Optional[str], Optional[str]]) -> str:
        c, s = thing
        return f"{c} {s}" if c and s else (s or f"{c} object")

    things: Set[Tuple[Optional[str], Optional[str]]] = {(None, s) for s in SHAPES}
    things |= {(o.colour, o.shape) for o in left.objects + right.objects}
    things |= {(o.colour, None) for o in left.objects + right.objects}
    things |= {(rng.choice(tuple(COLOURS)), rng.choice(SHAPES)) for _ in range(3)}
    things_list = sorted(things, key=lambda t: (t[0] or "", t[1] or ""))
    nl, nr = len(left.objects), len(right.objects)
    families: Dict[str, List[Tuple[str, bool]]] = {
        "both": [(f"both images contain a {name(t)}", has(left, t) and has(right, t)) for t in things_list],
        "exactly_one": [(f"exactly one image contains a {name(t)}", has(left, t) != has(right, t)) for t in things_list],
        "neither": [(f"neither image contains a {name(t)}", not (has(left, t) or has(right, t))) for t in things_list],
        "side": [(f"the {side} image contains a {name(t)}", has(sc, t)) for t in things_list for side, sc in (("left", left), ("right", right))],
        "count": [
            ("the left image has more objects than the right image", nl > nr),
            ("the right image has more objects than the left image", nr > nl),
            ("both images have the same number of objects", nl == nr),
            (f"there are {NUMBER_WORDS[nl + nr]} objects in total", True),
            (f"there are {NUMBER_WORDS[rng.choice([m for m in range(2, 2 * _MAX_OBJECTS + 1) if m != nl + nr])]} objects in total", False),
        ],
    }
    target = rng.random() < 0.5
    for family in rng.sample(sorted(families), len(families)):
        matching = [text for text, truth in families[family] if truth == target]
        if matching:
            return _fix_articles(rng.choice(matching)), str(target)
    text, truth = rng.choice(families["count"])  # unreachable: "count" has both truths
    return _fix_articles(text), str(truth)


def _referring_expression(obj: SceneObject, rng: random.Random) -> str:
    templates = (
        lambda: f"the {obj.colour} {obj.shape}",
        lambda: f"the {obj.shape}",
        lambda: f"the {obj.colour} object",
        lambda: f"the {obj.size} {obj.shape} {_position_phrase(obj.cell, rng)}",
        lambda: f"the {obj.shape} {_position_phrase(obj.cell, rng)}",
        lambda: f"the {obj.size} {obj.colour} {obj.shape}",
    )
    return rng.choice(templates)()


def _detections(scene: Scene, rng: random.Random, image_size: int) -> List[List[float]]:
    """True boxes plus 2-3 distractors (shifted true boxes or boxes in empty cells), shuffled."""
    boxes = [o.box for o in scene.objects]
    used = {o.cell for o in scene.objects}
    for _ in range(rng.randint(2, 3)):
        if rng.random() < 0.5:
            x, y, w, h = rng.choice(boxes[: len(scene.objects)])
            dx, dy = (rng.choice((-1, 1)) * rng.uniform(0.4, 0.7) * w, rng.choice((-1, 1)) * rng.uniform(0.4, 0.7) * h)
            x, y = min(max(0.0, x + dx), image_size - w), min(max(0.0, y + dy), image_size - h)
        else:
            free = [c for c in range(9) if c not in used] or list(range(9))
            cell = rng.choice(free)
            w = h = rng.uniform(0.15, 0.3) * image_size
            side = image_size / 3
            x = min(max(0.0, (cell % 3 + 0.5) * side - w / 2 + rng.uniform(-2, 2)), image_size - w)
            y = min(max(0.0, (cell // 3 + 0.5) * side - h / 2 + rng.uniform(-2, 2)), image_size - h)
        boxes.append([round(x, 1), round(y, 1), round(w, 1), round(h, 1)])
    rng.shuffle(boxes)
    return boxes


# --------------------------------------------------------------------------------------
# Records in the reference formats
# --------------------------------------------------------------------------------------


def _build_records(scenes: Dict[str, List[Scene]], seed: int, captions_per_image: int, image_size: int) -> Dict[str, Any]:
    """Every JSON file's content, keyed by file name; plus the vocabulary corpus as a list."""
    out: Dict[str, Any] = {name: [] for name in _FILE_FIELDS.values() if name.endswith(".json") and name != "manifest.json"}
    out["grounding_dets.json"], out["grounding_gt.json"], out["scenes.json"] = {}, {}, {}
    corpus: List[str] = []
    answers = sorted(set(COLOURS) | set(SHAPES) | set(SIZES) | set(POSITIONS) | {"yes", "no"})
    answers += [str(i) for i in range(1, _MAX_OBJECTS + 1)]
    out["answer_list.json"] = answers
    corpus += answers

    for split, split_scenes in scenes.items():
        nlvr_name = {"train": "nlvr_train.json", "val": "nlvr_dev.json", "test": "nlvr_test.json"}[split]
        for i, sc in enumerate(split_scenes):
            image_no_ext = sc.image.rsplit(".", 1)[0]
            out["scenes.json"][sc.image] = {
                "image_id": sc.image_id,
                "split": split,
                "background": list(sc.background),
                "objects": [
                    {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position, "bbox": o.box}
                    for o in sc.objects
                ],
            }
            # retrieval / pre-training
            caps = _captions(sc, _rng(seed, split, i, "captions"), captions_per_image)
            corpus += caps
            if split == "train":
                out["retrieval_train.json"] += [{"image": sc.image, "caption": c, "image_id": sc.image_id} for c in caps]
                out["pretrain.json"].append({"image": sc.image, "caption": caps})
                obj_rng = _rng(seed, split, i, "pretrain_objects")
                single = _fix_articles(_object_phrase(obj_rng.choice(sc.objects), obj_rng, _detail(obj_rng)))
                out["pretrain_objects.json"].append({"image": sc.image, "caption": single})
                corpus.append(single)
            else:
                out[f"retrieval_{split}.json"].append({"image": sc.image, "caption": caps})
            if split == "test":
                neg_rng = _rng(seed, split, i, "hard_negative")
                for c in caps:
                    neg = swap_colours(c, neg_rng)
                    if neg is not None:
                        out["hard_negatives_test.json"].append({"image": sc.image, "caption": c, "negative": neg})
                        corpus.append(neg)
                        break
            # VQA: three questions per image, ten noisy annotator answers each
            vqa_rng = _rng(seed, split, i, "vqa")
            for k, (question, answer, candidates) in enumerate(_vqa_questions(sc, vqa_rng, 3)):
                rec: Dict[str, Any] = {"image": sc.image, "question": question}
                if split != "train":
                    rec["question_id"] = sc.image_id * 10 + k
                rec["answer"] = _noisy_answers(answer, candidates, vqa_rng)
                rec["dataset"] = "vqa"
                out[f"vqa_{split}.json"].append(rec)
                corpus.append(question)
            # VE: image id without extension
            for sentence, label in _ve_statements(sc, _rng(seed, split, i, "ve")):
                out[f"ve_{split}.json"].append({"image": image_no_ext, "sentence": sentence, "label": label})
                corpus.append(sentence)
            # grounding: one expression per object
            ref_rng = _rng(seed, split, i, "grounding")
            for k, obj in enumerate(sc.objects):
                text = _referring_expression(obj, ref_rng)
                ref_id = sc.image_id * 10 + k
                corpus.append(text)
                if split == "train":
                    out["grounding_train.json"].append({"image": sc.image, "text": text, "ref_id": ref_id, "image_id": sc.image_id})
                    continue
                # testA: large targets, testB: small ones (RefCOCO+ splits people vs objects).
                name = "grounding_val.json" if split == "val" else f"grounding_test{'A' if obj.size == 'large' else 'B'}.json"
                out[name].append({"image": sc.image, "text": text, "ref_id": ref_id})
                out["grounding_gt.json"][str(ref_id)] = {"image": sc.image, "bbox": obj.box}
            if split != "train":
                out["grounding_dets.json"][sc.image] = _detections(sc, _rng(seed, split, i, "dets"), image_size)
        # NLVR2: one pair per image, partner drawn from the same split
        pair_rng = _rng(seed, split, -1, "nlvr")
        for i, left in enumerate(split_scenes):
            if len(split_scenes) < 2:
                break
            j = pair_rng.randrange(len(split_scenes) - 1)
            right = split_scenes[j + (j >= i)]
            sentence, label = _nlvr_statement(left, right, pair_rng)
            out[nlvr_name].append({"images": [left.image, right.image], "sentence": sentence, "label": label})
            corpus.append(sentence)
    out["vocab_corpus.txt"] = list(dict.fromkeys(corpus))
    return out


# --------------------------------------------------------------------------------------
# Generation with an on-disk cache
# --------------------------------------------------------------------------------------


def _params(seed: int, image_size: int, num_train: int, num_val: int, num_test: int, captions_per_image: int) -> Dict[str, Any]:
    if min(num_train, num_val, num_test) < 1 or captions_per_image < 1:
        raise ValueError("num_train, num_val, num_test and captions_per_image must all be >= 1")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    return {
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "captions_per_image": captions_per_image,
    }


def default_shapes_root(
    cache_dir: PathLike,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 4000,
    num_val: int = 300,
    num_test: int = 500,
    captions_per_image: int = 5,
) -> Path:
    """A per-parameter directory under ``cache_dir``, so different worlds never collide.

    Args:
        cache_dir (PathLike): directory holding cached worlds.
        seed, image_size, num_train, num_val, num_test, captions_per_image: as in
            :func:`generate_shapes_world`.

    Returns:
        Path: ``cache_dir / "shapes_v<FORMAT_VERSION>_<hash of the parameters>"``.
    """
    params = _params(seed, image_size, num_train, num_val, num_test, captions_per_image)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / f"shapes_v{FORMAT_VERSION}_{digest}"


def _read_manifest(root: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(root / "manifest.json") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_current(manifest: Optional[Dict[str, Any]], params: Dict[str, Any]) -> bool:
    return manifest is not None and manifest.get("format_version") == FORMAT_VERSION and manifest.get("params") == params


def _render_job(job: Tuple[Scene, int, str]) -> None:
    scene, image_size, path = job
    render_scene(scene, image_size).save(path, format="PNG", compress_level=1)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"))


def _generate_into(tmp: Path, params: Dict[str, Any], num_workers: int) -> Dict[str, Any]:
    seed, image_size = params["seed"], params["image_size"]
    scenes: Dict[str, List[Scene]] = {}
    next_id = 0
    for split in SPLITS:
        scenes[split] = []
        (tmp / "images" / split).mkdir(parents=True)
        for i in range(params[f"num_{split}"]):
            objects, background = sample_scene(_rng(seed, split, i, "scene"), image_size)
            noise_seed = _int_seed("shapes-world", seed, split, i, "noise")
            scenes[split].append(Scene(f"{split}/{i:06d}.png", next_id, objects, background, noise_seed))
            next_id += 1
    jobs = [(sc, image_size, str(tmp / "images" / sc.image)) for split in SPLITS for sc in scenes[split]]
    if num_workers > 1:
        # Each image depends only on its own scene, so the output is independent of the pool.
        with multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(num_workers) as pool:
            pool.map(_render_job, jobs, chunksize=64)
    else:
        for job in jobs:
            _render_job(job)

    records = _build_records(scenes, seed, params["captions_per_image"], image_size)
    counts: Dict[str, int] = {}
    for name, data in records.items():
        if name.endswith(".txt"):
            (tmp / name).write_text("\n".join(data) + "\n")
        else:
            _write_json(tmp / name, data)
        counts[name] = len(data)
    manifest = {
        "format_version": FORMAT_VERSION,
        "params": params,
        "counts": counts,
        "files": sorted(_FILE_FIELDS.values()),
        "image_root": "images",
    }
    _write_json(tmp / "manifest.json", manifest)  # written last: its presence marks completeness
    return manifest


def generate_shapes_world(
    root: PathLike,
    *,
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 4000,
    num_val: int = 300,
    num_test: int = 500,
    captions_per_image: int = 5,
    overwrite: bool = False,
    num_workers: Optional[int] = None,
) -> ShapesWorld:
    """Generate (or reuse) a shapes world under ``root``.

    If ``root/manifest.json`` records the same parameters and format version, the cached world
    is returned without touching any file. Otherwise the world is generated into a temporary
    sibling directory that is renamed to ``root`` only when complete, so a killed run never
    leaves a cache that looks valid; concurrent callers (e.g. every rank of a torchrun job)
    are safe: the first rename wins and the others reuse its result.

    Args:
        root (PathLike): output directory. Use :func:`default_shapes_root` to get one that
            depends on the parameters.
        seed (int): world seed; same seed and parameters give byte-identical files.
        image_size (int): image side in pixels. Default: 64.
        num_train (int): training images. Default: 4000.
        num_val (int): validation images. Default: 300.
        num_test (int): test images. Default: 500.
        captions_per_image (int): distinct captions per image. Default: 5.
        overwrite (bool): regenerate and replace whatever ``root`` holds (another world, a
            matching world, or a non-empty directory without a manifest). If ``False``, a
            matching world is reused and anything else raises.
        num_workers (Optional[int]): rendering processes; ``None`` picks
            ``min(4, cpu_count)`` for large worlds and 1 for small ones. Does not change
            the output.

    Returns:
        ShapesWorld: the paths of every generated file.

    Raises:
        FileExistsError: ``root`` holds something else and ``overwrite`` is ``False``.
    """
    params = _params(seed, image_size, num_train, num_val, num_test, captions_per_image)
    root = Path(root)
    manifest = _read_manifest(root)
    if _is_current(manifest, params) and not overwrite:
        return ShapesWorld.from_root(root, params)
    if root.exists() and any(root.iterdir()) and not overwrite:
        found = f"parameters {manifest.get('params')} (format {manifest.get('format_version')})" if manifest else "no manifest.json"
        raise FileExistsError(
            f"{root} already exists with {found}, not the requested {params} (format {FORMAT_VERSION}). "
            "Pass overwrite=True to replace it, or use default_shapes_root(cache_dir, ...) for a "
            "directory per parameter set."
        )
    if num_workers is None:
        total = num_train + num_val + num_test
        num_workers = min(4, os.cpu_count() or 1) if total >= 1000 else 1

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _generate_into(tmp, params, num_workers)
        if root.exists():
            if not any(root.iterdir()):
                root.rmdir()
            elif overwrite:
                trash = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
                root.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:
            # Another process finished first; its world is identical if it is current.
            if not _is_current(_read_manifest(root), params):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ShapesWorld.from_root(root, params)


def cached_shapes_world(cache_dir: PathLike, **params: Any) -> ShapesWorld:
    """``generate_shapes_world(default_shapes_root(cache_dir, **params), **params)``.

    Args:
        cache_dir (PathLike): directory holding cached worlds.
        **params: generation parameters of :func:`generate_shapes_world` (not ``overwrite``).

    Returns:
        ShapesWorld: the cached or freshly generated world.
    """
    root_params = {k: v for k, v in params.items() if k != "num_workers"}
    return generate_shapes_world(default_shapes_root(cache_dir, **root_params), **params)
