"""Reference captions for procedural scenes.

Every caption is true of its scene, lowercase, without punctuation and at most
``MAX_CAPTION_WORDS`` words (OFA truncates training targets at 20 words).
Simple scenes get short captions ("a red circle"); scenes with several objects
get lists, counts, grid positions and spatial relations
("a red circle left of a blue square and a green triangle above a small yellow diamond").
"""

from typing import Callable, List, Optional, Sequence

import numpy as np

from .scenes import GRID, Scene, SceneObject, true_relations

MAX_CAPTION_WORDS = 20
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
BACKGROUND_PHRASES = {"plain": "on a white background", "textured": "on a grey textured background"}
_ROW_NAMES = ("top", "middle", "bottom")
_COL_NAMES = ("left", "middle", "right")


def with_article(phrase: str) -> str:
    """'a red circle' / 'an orange square'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(obj: SceneObject, with_size: bool = False) -> str:
    """'a red circle' or, with the size, 'a large red circle'."""
    return with_article(f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}")


def position_phrase(obj: SceneObject) -> str:
    """Where the object's grid cell is: 'at the top left', 'in the centre', 'on the right'."""
    assert GRID == 3, "position names assume a 3x3 grid"
    row, col = obj.cell
    if row == 1 and col == 1:
        return "in the centre"
    if row == 1:
        return f"on the {_COL_NAMES[col]}"
    if col == 1:
        return f"at the {_ROW_NAMES[row]}"
    return f"at the {_ROW_NAMES[row]} {_COL_NAMES[col]}"


def join_phrases(phrases: Sequence[str]) -> str:
    """'x' / 'x and y' / 'x y and z' (no commas: captions carry no punctuation)."""
    return phrases[0] if len(phrases) == 1 else " ".join(phrases[:-1]) + " and " + phrases[-1]


def _reading_order(scene: Scene) -> List[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.cell[1], o.cell[0]))


def _listing(scene: Scene, rng: np.random.Generator, with_size: bool) -> str:
    objs = _reading_order(scene) if rng.random() < 0.5 else [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    return join_phrases([noun_phrase(o, with_size) for o in objs])


def _count(scene: Scene, rng: np.random.Generator) -> str:
    n = len(scene.objects)
    if n == 1:
        obj = scene.objects[0]
        return f"one {obj.colour} {obj.shape}" if rng.random() < 0.5 else f"a single {obj.size} {obj.colour} {obj.shape}"
    if rng.random() < 0.5:
        return f"{NUMBER_WORDS[n]} shapes {BACKGROUND_PHRASES[scene.background]}"
    obj = scene.objects[int(rng.integers(n))]
    return f"{NUMBER_WORDS[n]} shapes including {noun_phrase(obj, rng.random() < 0.5)}"


def _positions(scene: Scene, rng: np.random.Generator) -> str:
    k = min(len(scene.objects), 2)
    chosen = [scene.objects[i] for i in sorted(rng.choice(len(scene.objects), size=k, replace=False))]
    return join_phrases([f"{noun_phrase(o, rng.random() < 0.3)} {position_phrase(o)}" for o in chosen])


def _relations(scene: Scene, rng: np.random.Generator) -> Optional[str]:
    facts = true_relations(scene)
    if not facts:
        return None
    order = rng.permutation(len(facts))
    first = facts[int(order[0])]
    clauses = [first]
    if len(scene.objects) >= 3:
        # a second fact about a different pair of objects, if there is one
        for i in order[1:]:
            a, _, b = facts[int(i)]
            if {id(a), id(b)} != {id(first[0]), id(first[2])}:
                clauses.append(facts[int(i)])
                break
    return join_phrases([f"{noun_phrase(a, rng.random() < 0.3)} {rel} {noun_phrase(b, rng.random() < 0.3)}"
                         for a, rel, b in clauses])


def _with_background(scene: Scene, rng: np.random.Generator) -> str:
    return f"{_listing(scene, rng, rng.random() < 0.5)} {BACKGROUND_PHRASES[scene.background]}"


_TEMPLATES: Sequence[Callable[[Scene, np.random.Generator], Optional[str]]] = (
    lambda s, r: _listing(s, r, False),
    lambda s, r: _listing(s, r, True),
    _count,
    _positions,
    _relations,
    _with_background,
)


def reference_captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> List[str]:
    """``n`` true captions of the scene, distinct where the scene allows it."""
    refs: List[str] = []
    for _ in range(4):  # a few rounds over the templates give enough distinct phrasings
        for t in rng.permutation(len(_TEMPLATES)):
            cap = _TEMPLATES[int(t)](scene, rng)
            if cap and len(cap.split()) <= MAX_CAPTION_WORDS and cap not in refs:
                refs.append(cap)
            if len(refs) == n:
                return refs
    distinct = len(refs)
    while len(refs) < n:  # tiny scenes with few phrasings: repeat (COCO references may repeat too)
        refs.append(refs[(len(refs) - distinct) % distinct])
    return refs


def premise_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption used as the SNLI-VE premise (OFA's ``--add-caption`` text)."""
    refs = reference_captions(scene, rng, n=3)
    return refs[int(rng.integers(len(refs)))]
