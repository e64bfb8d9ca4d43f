"""Procedural scenes: 1-4 flat-coloured shapes on a small canvas.

A scene places each object in its own cell of a 3x3 grid (centre plus a small
jitter), so spatial relations between objects are never borderline: two objects
are either clearly in different columns/rows or clearly in the same one.
Coordinates are normalised to [0, 1] (y grows downwards), so a scene renders at
any ``image_size``.

Difficulty grows with the number of objects, with similar colours
(red/orange, orange/yellow, blue/purple) and with a textured grey background;
one shape on plain white is the easiest input.

Within a scene every (colour, shape) pair is unique, so "the red circle" always
names exactly one object or none.
"""

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (230, 205, 20),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (145, 55, 200),
}
SIMILAR_COLOURS: Tuple[Tuple[str, str], ...] = (("red", "orange"), ("orange", "yellow"), ("blue", "purple"))
SIZES: Dict[str, float] = {"small": 0.08, "large": 0.13}  # circumradius as a fraction of the canvas
BACKGROUNDS: Tuple[str, ...] = ("plain", "textured")

GRID = 3            # objects sit in distinct cells of a GRID x GRID grid
JITTER = 0.03       # max offset of an object centre from its cell centre
RELATION_GAP = 0.2  # min centre distance along an axis for left/right/above/below to hold
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE_RELATION: Dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Per number of objects (1..4): probability of sampling it, of a similar-colour pair, of a textured background.
N_OBJECTS_PROBS = (0.25, 0.25, 0.25, 0.25)
P_SIMILAR = (0.0, 0.35, 0.5, 0.6)
P_TEXTURED = (0.0, 0.2, 0.4, 0.5)


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``x``, ``y`` are its centre in [0, 1] canvas coordinates."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def cell(self) -> Tuple[int, int]:
        """(row, column) of the grid cell holding this object."""
        return min(int(self.y * GRID), GRID - 1), min(int(self.x * GRID), GRID - 1)


@dataclass(frozen=True)
class Scene:
    """A list of objects plus the background style (``texture_seed`` fixes the texture)."""

    objects: Tuple[SceneObject, ...]
    background: str = "plain"
    texture_seed: int = 0

    def matching(self, colour: Optional[str] = None, shape: Optional[str] = None,
                 size: Optional[str] = None) -> List[SceneObject]:
        """Objects agreeing with every attribute that is not None."""
        return [o for o in self.objects
                if (colour is None or o.colour == colour)
                and (shape is None or o.shape == shape)
                and (size is None or o.size == size)]

    def find(self, colour: str, shape: str) -> Optional[SceneObject]:
        """The unique object with this colour and shape, or None."""
        found = self.matching(colour=colour, shape=shape)
        return found[0] if found else None

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background,
                "texture_seed": self.texture_seed}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(SceneObject(**o) for o in d["objects"]), d["background"], d["texture_seed"])


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` ("left of", "right of", "above", "below") ``b``."""
    if relation == "left of":
        return b.x - a.x >= RELATION_GAP
    if relation == "right of":
        return a.x - b.x >= RELATION_GAP
    if relation == "above":
        return b.y - a.y >= RELATION_GAP
    if relation == "below":
        return a.y - b.y >= RELATION_GAP
    raise ValueError(f"unknown relation {relation!r}")


def true_relations(scene: Scene) -> List[Tuple[SceneObject, str, SceneObject]]:
    """Every (a, relation, b) that holds between two distinct objects of the scene."""
    return [(a, rel, b) for a in scene.objects for b in scene.objects if a is not b
            for rel in RELATIONS if relation_holds(a, rel, b)]


def has_similar_colours(scene: Scene) -> bool:
    colours = {o.colour for o in scene.objects}
    return any(a in colours and b in colours for a, b in SIMILAR_COLOURS)


def scene_difficulty(scene: Scene) -> int:
    """0 (one shape, plain background) .. 5 (four shapes, similar colours, textured)."""
    return (len(scene.objects) - 1) + int(has_similar_colours(scene)) + int(scene.background == "textured")


def difficulty_bucket(difficulty: int) -> str:
    """'easy' (0-1), 'medium' (2-3) or 'hard' (4-5)."""
    return "easy" if difficulty <= 1 else ("medium" if difficulty <= 3 else "hard")


def sample_scene(rng: np.random.Generator, n_objects: Optional[int] = None) -> Scene:
    """Draw a scene; the result depends only on the generator's state."""
    n = int(n_objects if n_objects is not None else rng.choice([1, 2, 3, 4], p=N_OBJECTS_PROBS))
    if not 1 <= n <= 4:
        raise ValueError("a scene holds 1 to 4 objects")
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colour_names = list(COLOURS)
    forced_colours: List[str] = []
    if rng.random() < P_SIMILAR[n - 1]:
        pair = SIMILAR_COLOURS[int(rng.integers(len(SIMILAR_COLOURS)))]
        forced_colours = list(pair) if rng.random() < 0.5 else [pair[1], pair[0]]
    objects: List[SceneObject] = []
    used = set()
    for i, cell in enumerate(cells):
        while True:
            colour = forced_colours[i] if i < len(forced_colours) else colour_names[int(rng.integers(len(colour_names)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if (colour, shape) not in used:
                break
        used.add((colour, shape))
        size = "small" if rng.random() < 0.5 else "large"
        row, col = divmod(int(cell), GRID)
        x = (col + 0.5) / GRID + rng.uniform(-JITTER, JITTER)
        y = (row + 0.5) / GRID + rng.uniform(-JITTER, JITTER)
        objects.append(SceneObject(shape, colour, size, round(float(x), 4), round(float(y), 4)))
    background = "textured" if rng.random() < P_TEXTURED[n - 1] else "plain"
    texture_seed = int(rng.integers(2**31))
    return Scene(tuple(objects), background, texture_seed)


def _background(scene: Scene, image_size: int) -> Image.Image:
    if scene.background == "plain":
        return Image.new("RGB", (image_size, image_size), (255, 255, 255))
    # coarse grey blocks (12x12 grid), upsampled without smoothing: visible clutter, compresses well
    shades = np.random.default_rng(scene.texture_seed).integers(175, 226, size=(12, 12), dtype=np.uint8)
    grey = Image.fromarray(shades, mode="L").resize((image_size, image_size), Image.NEAREST)
    return grey.convert("RGB")


def _shape_points(shape: str, cx: float, cy: float, r: float) -> Sequence[Tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - 0.92 * r, cy + 0.7 * r), (cx + 0.92 * r, cy + 0.7 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    raise ValueError(shape)


def render(scene: Scene, image_size: int = 96) -> Image.Image:
    """Draw the scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    image = _background(scene, image_size)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * image_size, obj.y * image_size, SIZES[obj.size] * image_size
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            h = 0.82 * r  # a square of similar area to the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    return image
