"""Visual entailment hypotheses for procedural scenes, with a checkable structure.

Each hypothesis is a :class:`Hypothesis` (structured form) whose ``text`` is
what goes into the TSV. :func:`evaluate` decides it from the scene alone:
True -> entailment, False -> contradiction, None -> neutral.

Decidable kinds (what the pixels show: colour, shape, size, count, position):
  exists    "there is a (large) (red) circle" / "there is a red shape"
  absent    "there is no red circle"
  count     "there are two circles" / "there is one red shape" / "there are three shapes"
  relation  "the red circle is left of the blue square" (left of / right of / above / below)

Neutral design -- statements the rendering cannot settle, about an object that
*is* in the picture (so the sentence is meaningful and only its predicate is
undecidable):
  property  "the red circle is made of wood" -- shapes are flat colour fills, so
            material, weight, age, ... are never drawn (``UNOBSERVABLE_PROPERTIES``)
  hidden    "there is something hidden behind the red circle" -- nothing ever
            overlaps, so what lies behind a shape is invisible
  outside   "there is a red circle outside the picture" -- the canvas is all that is shown
A ``property``/``hidden`` statement about an object that is *not* in the picture
is false (its subject does not exist), so such statements are also generated as
contradictions: the model must ground the subject, not just spot the
"undecidable" phrasing.
"""

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .captions import NUMBER_WORDS, with_article
from .scenes import COLOURS, OPPOSITE_RELATION, SHAPES, SIZES, Scene, relation_holds, true_relations

LABELS: Tuple[str, ...] = ("entailment", "contradiction", "neutral")
ANSWER_OF_LABEL: Dict[str, str] = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
DECIDABLE_KINDS: Tuple[str, ...] = ("exists", "absent", "count", "relation")
NEUTRAL_KINDS: Tuple[str, ...] = ("property", "hidden", "outside")
UNOBSERVABLE_PROPERTIES: Tuple[str, ...] = (
    "made of wood", "made of metal", "made of glass", "made of paper", "heavy", "hollow", "magnetic", "very old")


@dataclass(frozen=True)
class Hypothesis:
    """Structured hypothesis. ``colour``/``shape``/``size`` describe the subject
    (None = unconstrained); ``other_*`` the relation's second object."""

    kind: str
    colour: Optional[str] = None
    shape: Optional[str] = None
    size: Optional[str] = None
    count: Optional[int] = None
    relation: Optional[str] = None
    other_colour: Optional[str] = None
    other_shape: Optional[str] = None
    prop: Optional[str] = None

    @property
    def text(self) -> str:
        """The hypothesis sentence (lowercase, no punctuation)."""
        desc = " ".join(w for w in (self.size, self.colour, self.shape or "shape") if w)
        if self.kind == "exists":
            return f"there is {with_article(desc)}"
        if self.kind == "absent":
            return f"there is no {desc}"
        if self.kind == "count":
            return f"there is one {desc}" if self.count == 1 else f"there are {NUMBER_WORDS[self.count]} {desc}s"
        if self.kind == "relation":
            return f"the {self.colour} {self.shape} is {self.relation} the {self.other_colour} {self.other_shape}"
        if self.kind == "property":
            return f"the {self.colour} {self.shape} is {self.prop}"
        if self.kind == "hidden":
            return f"there is something hidden behind the {self.colour} {self.shape}"
        if self.kind == "outside":
            return f"there is {with_article(desc)} outside the picture"
        raise ValueError(f"unknown hypothesis kind {self.kind!r}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Hypothesis":
        return cls(**d)


def evaluate(scene: Scene, h: Hypothesis) -> Optional[bool]:
    """True/False when the picture decides the hypothesis, None when it cannot."""
    subject = scene.matching(colour=h.colour, shape=h.shape, size=h.size)
    if h.kind == "exists":
        return len(subject) > 0
    if h.kind == "absent":
        return len(subject) == 0
    if h.kind == "count":
        return len(subject) == h.count
    if h.kind == "relation":
        a, b = scene.find(h.colour, h.shape), scene.find(h.other_colour, h.other_shape)
        return a is not None and b is not None and relation_holds(a, h.relation, b)
    if h.kind in ("property", "hidden"):
        return None if scene.find(h.colour, h.shape) is not None else False
    if h.kind == "outside":
        return None
    raise ValueError(f"unknown hypothesis kind {h.kind!r}")


def is_true(scene: Scene, h: Hypothesis) -> bool:
    """Whether the picture shows the hypothesis to be true."""
    return evaluate(scene, h) is True


def label_of(scene: Scene, h: Hypothesis) -> str:
    """'entailment' / 'contradiction' / 'neutral' from :func:`evaluate`."""
    verdict = evaluate(scene, h)
    return "neutral" if verdict is None else ("entailment" if verdict else "contradiction")


# ---------------------------------------------------------------- sampling

def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _exists_true(scene, rng):
    o = _pick(rng, scene.objects)
    pattern = _pick(rng, [("colour", "shape"), ("size", "colour", "shape"), ("shape",), ("colour",)])
    return Hypothesis("exists", **{k: getattr(o, k) for k in pattern})


def _absent_filter(scene, rng, kind):
    for _ in range(20):
        h = Hypothesis(kind, colour=_pick(rng, list(COLOURS)), shape=_pick(rng, SHAPES))
        if not scene.matching(colour=h.colour, shape=h.shape):
            return h
    return None


def _count_hyp(scene, rng, correct):
    o = _pick(rng, scene.objects)
    pattern = _pick(rng, [(), ("shape",), ("colour",)])
    attrs = {k: getattr(o, k) for k in pattern}
    n = len(scene.matching(**attrs))
    if not correct:
        n = _pick(rng, [c for c in (1, 2, 3, 4) if c != n])
    return Hypothesis("count", count=n, **attrs)


def _relation_hyp(scene, rng, correct):
    facts = true_relations(scene)
    if not facts:
        return None
    a, rel, b = _pick(rng, facts)
    if not correct:
        if rng.random() < 0.5:
            rel = OPPOSITE_RELATION[rel]
        else:
            a, b = b, a
    return Hypothesis("relation", colour=a.colour, shape=a.shape, relation=rel,
                      other_colour=b.colour, other_shape=b.shape)


def _exists_false(scene, rng):
    """Perturb one attribute of a present object until nothing matches."""
    for _ in range(20):
        o = _pick(rng, scene.objects)
        pattern = _pick(rng, [("colour", "shape"), ("size", "colour", "shape"), ("shape",), ("colour",)])
        attrs = {k: getattr(o, k) for k in pattern}
        key = _pick(rng, pattern)
        choices = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[key]
        attrs[key] = _pick(rng, [c for c in choices if c != attrs[key]])
        if not scene.matching(**attrs):
            return Hypothesis("exists", **attrs)
    return None


def _absent_false(scene, rng):
    o = _pick(rng, scene.objects)
    return Hypothesis("absent", colour=o.colour, shape=o.shape)


def _neutral_about_absent(scene, rng):
    """A property/hidden statement whose subject is not in the picture (false)."""
    h = _absent_filter(scene, rng, "property")
    if h is None:
        return None
    if rng.random() < 0.7:
        return Hypothesis("property", colour=h.colour, shape=h.shape, prop=_pick(rng, UNOBSERVABLE_PROPERTIES))
    return Hypothesis("hidden", colour=h.colour, shape=h.shape)


def _property(scene, rng):
    o = _pick(rng, scene.objects)
    return Hypothesis("property", colour=o.colour, shape=o.shape, prop=_pick(rng, UNOBSERVABLE_PROPERTIES))


def _hidden(scene, rng):
    o = _pick(rng, scene.objects)
    return Hypothesis("hidden", colour=o.colour, shape=o.shape)


def _outside(scene, rng):
    pattern = _pick(rng, [("colour", "shape"), ("shape",)])
    attrs = {"colour": _pick(rng, list(COLOURS)), "shape": _pick(rng, SHAPES)}
    return Hypothesis("outside", **{k: attrs[k] for k in pattern})


# (weight, generator) per label; a generator may return None when the scene does not allow it
_GENERATORS: Dict[str, List[Tuple[float, Callable]]] = {
    "entailment": [(0.35, _exists_true), (0.15, lambda s, r: _absent_filter(s, r, "absent")),
                   (0.2, lambda s, r: _count_hyp(s, r, True)), (0.3, lambda s, r: _relation_hyp(s, r, True))],
    "contradiction": [(0.3, _exists_false), (0.1, _absent_false), (0.2, lambda s, r: _count_hyp(s, r, False)),
                      (0.25, lambda s, r: _relation_hyp(s, r, False)), (0.15, _neutral_about_absent)],
    "neutral": [(0.5, _property), (0.25, _hidden), (0.25, _outside)],
}


def sample_hypothesis(scene: Scene, label: str, rng: np.random.Generator) -> Hypothesis:
    """A hypothesis whose :func:`label_of` is ``label``."""
    gens = _GENERATORS[label]
    weights = np.array([w for w, _ in gens])
    for _ in range(50):
        gen = gens[int(rng.choice(len(gens), p=weights / weights.sum()))][1]
        h = gen(scene, rng)
        if h is not None and label_of(scene, h) == label:
            return h
    raise RuntimeError(f"could not sample a {label} hypothesis for {scene}")
