"""Generated image-text scenes for chapter 5: small RGB pictures of shapes, with captions.

A scene is a group of 1-3 identical objects (colour, shape, size) and, in half of the
scenes, one other object beside the group ("two small red squares left of a blue circle").
Everything comes from a seeded numpy generator, so a split is a pure function of
(seed, split name, size) and works offline.

Zero-shot means something because some colour x shape pairs (`HELDOUT_PAIRS`) never appear
in the training split at all, neither as the group nor as the other object, while each of
their colours and shapes does appear in other pairs. The "heldout" split is made of scenes
whose group is a held-out pair (its other object, if any, a seen pair); "test" holds new
scenes of seen pairs only.

Captions are text; `tokenize_captions` turns them into padded id arrays with any project
tokenizer (`caption_tokenizer()` is the default character one). A caption longer than the
text context is an error (one line, `ConfigError`: exit 2), never silently truncated: a cut caption
could drop the very word ("circle") that a contrastive loss must see.

For VQA, `make_qa(split)` asks every templated question (`questions_for`: counts, colours,
shapes, what is left / right of an object, which side) that has one right answer in each scene,
and `tokenize_qa` lays out question + answer rows with the answer-only loss mask. The splits are
the same, so held-out pairs never appear in a training question or answer either.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxcourse.data.tokenizers import CharTokenizer, Tokenizer
from jaxcourse.errors import ConfigError, UserError

IMAGE_SIZE = 32
COLOURS = ("red", "green", "blue", "yellow", "white")
RGB = np.array([[0.9, 0.15, 0.15], [0.15, 0.8, 0.2], [0.2, 0.35, 0.95], [0.95, 0.85, 0.1],
                [0.95, 0.95, 0.95]], np.float32)
SHAPES = ("square", "circle", "triangle", "diamond")
SIZES = ("small", "large")
RADIUS = (3.0, 4.5)        # half-width in pixels of a small / large object
COUNT_WORDS = ("one", "two", "three")
SIDES = ("left", "right")  # where the group is relative to the other object
# One held-out pair per shape and per colour but white: each colour and shape stays in training.
HELDOUT_PAIRS = (("red", "triangle"), ("green", "diamond"), ("blue", "circle"),
                 ("yellow", "square"))
SPLITS = ("train", "test", "heldout")
PAD = "\x00"               # the padding character: id 0 of the character tokenizer


@dataclasses.dataclass(frozen=True)
class Scenes:
    """N scenes. Attributes are indices into COLOURS, SHAPES, SIZES; count is 1..3; the other
    object's colour / shape and `side` (SIDES index of the group) are -1 when there is none."""
    images: np.ndarray         # [N, 32, 32, 3] float32 in [0, 1]
    colour: np.ndarray         # [N] int32, the group's colour
    shape: np.ndarray          # [N] int32, the group's shape
    size: np.ndarray           # [N] int32
    count: np.ndarray          # [N] int32, 1..3
    other_colour: np.ndarray   # [N] int32, -1: no other object
    other_shape: np.ndarray    # [N] int32, -1: no other object
    side: np.ndarray           # [N] int32, 0: group left of the other object, 1: right, -1
    captions: tuple            # N tuples of caption strings, all true of their scene

    def __len__(self) -> int:
        return len(self.images)

    @property
    def label(self) -> np.ndarray:
        """The group's colour x shape class, an index into `class_names()`."""
        return pair_index(self.colour, self.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        """{"image", "label"}: the columns the data pipeline and classification task take."""
        return {"image": self.images, "label": self.label}


def pair_index(colour, shape):
    return np.asarray(colour, np.int32) * len(SHAPES) + np.asarray(shape, np.int32)


def class_names() -> list[str]:
    """"red square", "red circle", ...: every colour x shape class, in label order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def heldout_labels() -> np.ndarray:
    """The labels of the held-out colour x shape pairs."""
    return np.array([pair_index(COLOURS.index(c), SHAPES.index(s)) for c, s in HELDOUT_PAIRS],
                    np.int32)


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


def captions_for(colour: int, shape: int, size: int, count: int, other_colour: int,
                 other_shape: int, side: int) -> tuple[str, ...]:
    """The template captions of one scene (four, each true of it)."""
    k, s, z = COLOURS[colour], plural(SHAPES[shape], count), SIZES[size]
    n = "a" if count == 1 else COUNT_WORDS[count - 1]
    if other_colour < 0:
        return (f"{n} {z} {k} {s}", f"a photo of {n} {k} {s}", f"{n} {k} {s} on black",
                f"{COUNT_WORDS[count - 1]} {z} {k} {s}")
    k2, s2 = COLOURS[other_colour], SHAPES[other_shape]
    where, opposite = SIDES[side], SIDES[1 - side]
    return (f"{n} {z} {k} {s} {where} of a {k2} {s2}",
            f"a {k2} {s2} {opposite} of {n} {k} {s}",
            f"{n} {k} {s} and a {k2} {s2}",
            f"a photo of {COUNT_WORDS[count - 1]} {z} {k} {s}")


# ---------------------------------------------------------------------------------------
# Drawing.

def shape_mask(shape: int, cy: float, cx: float, r: float, size: int = IMAGE_SIZE):
    """Boolean [size, size] mask of one object centred at (cy, cx) with half-width r."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    name = SHAPES[shape]
    if name == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if name == "circle":
        return dy ** 2 + dx ** 2 <= (r + 0.5) ** 2
    if name == "triangle":  # point up: width grows from 0 at the top to 2r at the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2 + 0.5)
    return np.abs(dy) + np.abs(dx) <= r + 0.5  # diamond


def _draw(img, rng, colour: int, shape: int, size: int, cy: float, cx: float):
    mask = shape_mask(shape, cy, cx, RADIUS[size])
    rgb = np.clip(RGB[colour] + rng.normal(0, 0.04, 3), 0, 1)
    img[mask] = rgb


def _render(rng, colour, shape, size, count, other_colour, other_shape, side):
    img = rng.uniform(0.0, 0.08, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    r = RADIUS[size]
    if other_colour < 0:
        x_group = IMAGE_SIZE / 2 + rng.uniform(-3, 3)
    else:
        x_group = (8 if side == 0 else 24) + rng.uniform(-2, 2)
        x_other = (24 if side == 0 else 8) + rng.uniform(-2, 2)
        y_other = rng.uniform(8, 24)
        _draw(img, rng, other_colour, other_shape, 1, y_other, x_other)
    slot = IMAGE_SIZE / count  # the group stacks vertically, one object per slot
    room = max(0.0, (slot - 2 * r - 1) / 2)
    for i in range(count):
        cy = (i + 0.5) * slot + rng.uniform(-room, room)
        _draw(img, rng, colour, shape, size, cy, x_group + rng.uniform(-1, 1))
    return img


def _pairs_allowed(split: str) -> tuple[np.ndarray, np.ndarray]:
    """[C, S] booleans: pairs the group may take, pairs the other object may take."""
    held = np.zeros((len(COLOURS), len(SHAPES)), bool)
    for c, s in HELDOUT_PAIRS:
        held[COLOURS.index(c), SHAPES.index(s)] = True
    return (held if split == "heldout" else ~held), ~held


def generate(n: int, seed: int = 0, split: str = "train") -> Scenes:
    """`n` scenes of one split, the same for the same (n, seed, split)."""
    if split not in SPLITS:
        raise UserError(f"unknown scenes split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 1:
        raise UserError(f"a scenes split needs at least one scene, got n={n}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    group_ok, other_ok = _pairs_allowed(split)
    group_pairs, other_pairs = np.argwhere(group_ok), np.argwhere(other_ok)
    cols = {k: np.empty(n, np.int32) for k in ("colour", "shape", "size", "count",
                                               "other_colour", "other_shape", "side")}
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    captions = []
    for i in range(n):
        c, s = group_pairs[rng.integers(len(group_pairs))]
        size, count = rng.integers(2), rng.integers(1, 4)
        if rng.random() < 0.5:
            while True:  # the other object differs from the group's pair
                oc, os_ = other_pairs[rng.integers(len(other_pairs))]
                if (oc, os_) != (c, s):
                    break
            side = rng.integers(2)
        else:
            oc = os_ = side = -1
        row = dict(colour=c, shape=s, size=size, count=count, other_colour=oc,
                   other_shape=os_, side=side)
        for k, v in row.items():
            cols[k][i] = v
        images[i] = _render(rng, **{k: int(v) for k, v in row.items()})
        captions.append(captions_for(**{k: int(v) for k, v in row.items()}))
    return Scenes(images=images, captions=tuple(captions), **cols)


def make_splits(n_train: int, n_test: int, n_heldout: int, seed: int = 0) -> dict[str, Scenes]:
    """{"train", "test" (seen pairs, new scenes), "heldout" (held-out pairs only)}."""
    return {"train": generate(n_train, seed, "train"), "test": generate(n_test, seed, "test"),
            "heldout": generate(n_heldout, seed, "heldout")}


# ---------------------------------------------------------------------------------------
# Text.

def caption_vocabulary() -> str:
    """Every character any caption, class name, prompt or question here can hold."""
    words = (COLOURS + SHAPES + SIZES + COUNT_WORDS + SIDES
             + ("a", "photo", "of", "and", "on", "black", "s", "how", "many", "what", "is",
                "are", "the", "colour", "shape", "ones", "where"))
    return "".join(sorted(set(" ".join(words)) | set(" ?")))


def caption_tokenizer() -> CharTokenizer:
    """Characters of the caption vocabulary, with the padding character PAD as id 0."""
    return CharTokenizer([PAD] + sorted(set(caption_vocabulary())))


def pad_id(tok: Tokenizer) -> int:
    """The id of PAD: 0 for `caption_tokenizer()` and for the byte-level BPEs."""
    ids = tok.encode(PAD)
    if len(ids) != 1:
        raise UserError("the tokenizer has no single id for the padding character \\x00")
    return ids[0]


def tokenize_captions(tok: Tokenizer, captions, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids [N, context] int32 padded with `pad_id(tok)`, valid [N, context] bool).

    A caption of more than `context` tokens raises ConfigError (exit 2) naming it: no
    truncation."""
    if context < 1:
        raise UserError(f"text context must be >= 1, got {context}")
    pad = pad_id(tok)
    ids = np.full((len(captions), context), pad, np.int32)
    valid = np.zeros((len(captions), context), bool)
    for i, text in enumerate(captions):
        row = tok.encode(text)
        if len(row) > context:
            raise ConfigError(f"caption {text!r} is {len(row)} tokens, longer than the text "
                            f"context {context}; raise the context")
        ids[i, :len(row)] = row
        valid[i, :len(row)] = True
    return ids, valid


# ---------------------------------------------------------------------------------------
# Questions and answers (chapter 5's VQA lab).

QUESTION_KINDS = ("count", "colour", "shape", "relation", "side")


@dataclasses.dataclass(frozen=True)
class QA:
    """M templated questions about the scenes of one split, each with its short answer."""
    scene: np.ndarray          # [M] int32, the scene (index into the split) asked about
    kind: np.ndarray           # [M] int32, index into QUESTION_KINDS
    questions: tuple           # M strings ("how many red squares?")
    answers: tuple             # M strings ("two")

    def __len__(self) -> int:
        return len(self.questions)


def questions_for(colour: int, shape: int, size: int, count: int, other_colour: int,
                  other_shape: int, side: int) -> list[tuple[str, str, str]]:
    """(kind, question, answer) of every template that has one right answer in this scene.

    count:    "how many red squares?" -> "two" (only about objects that are there)
    colour:   "what colour are the squares?" -> "red" (when no other object has that shape)
    shape:    "what shape is the red one?" -> "square" (when no other object has that colour)
    relation: "what is left of the blue circle?" -> "red square" (the colour and shape)
    side:     "where is the blue circle?" -> "right" (of the other object)
    """
    del size  # the templates do not ask about size
    k, s = COLOURS[colour], SHAPES[shape]
    objects = [(k, s, count)]
    if other_colour >= 0:
        objects.append((COLOURS[other_colour], SHAPES[other_shape], 1))
    out = []
    for kk, ss, n in objects:
        out.append(("count", f"how many {kk} {plural(ss, 2)}?", COUNT_WORDS[n - 1]))
        verb, noun, one = ("is", ss, "one") if n == 1 else ("are", plural(ss, n), "ones")
        if sum(o[1] == ss for o in objects) == 1:
            out.append(("colour", f"what colour {verb} the {noun}?", kk))
        if sum(o[0] == kk for o in objects) == 1:
            out.append(("shape", f"what shape {verb} the {kk} {one}?", ss))
    if other_colour >= 0:
        (k2, s2, _), where, opposite = objects[1], SIDES[side], SIDES[1 - side]
        out += [("relation", f"what is {where} of the {k2} {s2}?", f"{k} {s}"),
                ("relation", f"what is {opposite} of the {k} {plural(s, count)}?", f"{k2} {s2}"),
                ("side", f"where {'is' if count == 1 else 'are'} the {k} {plural(s, count)}?",
                 where),
                ("side", f"where is the {k2} {s2}?", opposite)]
    return out


def make_qa(split: Scenes) -> QA:
    """Every question of `questions_for` about every scene of a split, scene-major. A split
    made without held-out pairs (train, test) asks about none: its scenes hold none."""
    rows = []
    for i in range(len(split)):
        attrs = {k: int(getattr(split, k)[i]) for k in ("colour", "shape", "size", "count",
                                                        "other_colour", "other_shape", "side")}
        rows += [(i, kind, q, a) for kind, q, a in questions_for(**attrs)]
    scene, kind, questions, answers = zip(*rows)
    return QA(scene=np.array(scene, np.int32),
              kind=np.array([QUESTION_KINDS.index(k) for k in kind], np.int32),
              questions=questions, answers=answers)


def answer_vocabulary() -> tuple[str, ...]:
    """Every answer a template can give: counts, colours, shapes, sides, colour x shape pairs
    (the classes of a classifier VQA head; held-out pairs never answer a training question)."""
    return COUNT_WORDS + COLOURS + SHAPES + SIDES + tuple(class_names())


def tokenize_qa(tok: Tokenizer, questions, answers, context: int) -> dict[str, np.ndarray]:
    """Question + " " + answer + PAD (the end of the answer) as next-token rows of `context`:
    {"inputs", "targets" [N, context] int32, "mask" [N, context] bool (the targets that are an
    answer token or its end: the answer-only loss), "start" [N] int32 (the first answer
    token's position in the row)}. A question whose row does not fit is a ConfigError
    (exit 2) naming it, never truncated."""
    if context < 1:
        raise UserError(f"text context must be >= 1, got {context}")
    pad = pad_id(tok)
    seq = np.full((len(questions), context + 1), pad, np.int32)
    mask = np.zeros((len(questions), context), bool)
    start = np.zeros(len(questions), np.int32)
    for i, (q, a) in enumerate(zip(questions, answers)):
        prompt, answer = tok.encode(q + " "), tok.encode(a)
        n = len(prompt) + len(answer)
        if n > context:
            raise ConfigError(f"question {q!r} with its answer is {n} tokens, longer than the "
                              f"text context {context}; raise the context")
        seq[i, :n] = prompt + answer
        mask[i, len(prompt) - 1:n] = True  # targets: the answer's tokens, then its end (PAD)
        start[i] = len(prompt)
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": mask, "start": start}
