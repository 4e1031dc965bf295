"""Captions for pretraining the benchmark's tiny CLIP: noisy, partial, varied, like alt-text.

A caption does not always name every attribute of the main object (often only its colour or
only its shape), uses several phrasings (a few of them the hand-crafted prompts' "a photo of
a ..."), sometimes mentions the background, a distractor or the rendering style, and is
sometimes wrong: a neighbouring colour or a similar shape, or a distractor described instead
of the main object, as a careless human labeller would write.
"""
from __future__ import annotations

import numpy as np

from selftpt.benchmark.world import SIMILAR_COLORS, SIMILAR_SHAPES

COLOR_NOISE, SHAPE_NOISE, WRONG_OBJECT, EMPTY_CAPTION = 0.07, 0.04, 0.04, 0.02
FASHION_NOISE = 0.15  # confusable garment named instead (shirt / t-shirt / pullover / coat ...)

_PHOTO = ("a photo of {}.", "{}.", "a picture of {}.", "an image of {}.", "a close-up photo of {}.",
          "there is {} in the picture.", "a photo of {}.", "a rendering of {}.", "a good photo of {}.")
_STYLE = {
    "sketch": ("a sketch of {}.", "a drawing of {}.", "an outline of {}.", "a line drawing of {}."),
    "noisy": ("a blurry photo of {}.", "a noisy photo of {}.", "a grainy picture of {}."),
    "pastel": ("a faded photo of {}.", "a washed-out picture of {}.", "a pastel drawing of {}."),
    "clutter": ("a cluttered photo of {}.",),
    "photo": (),
    "clean": (),
}
_EMPTY = ("a picture.", "an image.", "a photo.", "untitled.")
_FASHION_TEMPLATES = ("a photo of a {}.", "a {}.", "a black and white photo of a {}.",
                      "a photo of a {}, a type of clothing.", "a grayscale product photo of a {}.",
                      "a small picture of a {}.", "{}.", "a low resolution photo of a {}.")
FASHION_SYNONYMS = {
    "t-shirt": ("tee shirt", "top"), "trousers": ("pants", "pair of trousers"),
    "pullover": ("sweater", "jumper"), "dress": ("summer dress",), "coat": ("jacket",),
    "sandal": ("summer sandal",), "shirt": ("button-up shirt",), "sneaker": ("running shoe", "trainer"),
    "bag": ("handbag", "purse"), "ankle boot": ("boot", "short boot"),
}
FASHION_CONFUSABLE = {
    "t-shirt": ("shirt", "pullover"), "shirt": ("t-shirt", "coat"), "pullover": ("coat", "shirt"),
    "coat": ("pullover", "shirt"), "dress": ("coat",), "trousers": ("dress",),
    "sandal": ("sneaker",), "sneaker": ("sandal", "ankle boot"), "ankle boot": ("sneaker",),
    "bag": ("coat",),
}


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def article(word: str, rng: np.random.Generator) -> str:
    """'an' before a vowel three times in four, else 'a' (alt-text is sloppy too)."""
    return "an" if word[:1] in "aeiou" and rng.random() < 0.75 else "a"


def _size_word(size: float, rng: np.random.Generator) -> str:
    if size < 0.2:
        return _pick(rng, ("small", "tiny"))
    if size > 0.28:
        return _pick(rng, ("large", "big"))
    return ""


def object_phrase(rng: np.random.Generator, color: str, shape: str, pattern: str = "solid",
                  size: float = 0.25) -> str:
    """A noun phrase naming some of the attributes, e.g. 'a striped red star', 'a star',
    'something red'."""
    if rng.random() < COLOR_NOISE:
        color = _pick(rng, SIMILAR_COLORS[color])
    if rng.random() < SHAPE_NOISE:
        shape = _pick(rng, SIMILAR_SHAPES[shape])
    say_color, say_shape = rng.random() < 0.8, rng.random() < 0.85
    if not (say_color or say_shape):
        say_color = say_shape = True
    words = []
    if rng.random() < 0.15 and (w := _size_word(size, rng)):
        words.append(w)
    if pattern != "solid" and rng.random() < 0.8:
        words.append(pattern)
    elif pattern == "solid" and rng.random() < 0.08:
        words.append("solid")
    if not say_shape:
        if words or rng.random() < 0.5:
            noun = " ".join(words + [color, _pick(rng, ("object", "shape", "thing"))])
            return f"{article(noun, rng)} {noun}"
        return f"something {color}"
    if say_color:
        words.append(color)
    noun = " ".join(words + [shape])
    return f"{article(noun, rng)} {noun}"


def world_caption(rng: np.random.Generator, color: str, shape: str, pattern: str, style: str,
                  size: float, distractors: list[tuple[str, str]], background_color: str) -> str:
    """One caption for a scene whose main object has the given attributes."""
    r = rng.random()
    if r < EMPTY_CAPTION:
        return _pick(rng, _EMPTY)
    if distractors and rng.random() < WRONG_OBJECT:
        color, shape = distractors[int(rng.integers(len(distractors)))]
        pattern, size = "solid", size * 0.6
    np_main = object_phrase(rng, color, shape, pattern, size)
    u = rng.random()
    if _STYLE[style] and u < 0.55:
        return _pick(rng, _STYLE[style]).format(np_main)
    if u < 0.7 or not distractors:
        if rng.random() < 0.12:
            return f"{np_main} on {article(background_color, rng)} {background_color} background."
        return _pick(rng, _PHOTO).format(np_main)
    dc, ds = distractors[int(rng.integers(len(distractors)))]
    np_other = object_phrase(rng, dc, ds, "solid", size * 0.6)
    form = _pick(rng, ("{} and {}.", "{} next to {}.", "a photo of {} and {}.", "{} with {} nearby."))
    if rng.random() < 0.3:
        k = len(distractors)
        return f"a photo of {np_main} and {'another shape' if k == 1 else f'{k} other shapes'}."
    return form.format(np_main, np_other)


def fashion_caption(rng: np.random.Generator, name: str) -> str:
    """One caption for a Fashion-MNIST image of class ``name`` (catalog's class names)."""
    if rng.random() < EMPTY_CAPTION:
        return _pick(rng, _EMPTY)
    if rng.random() < FASHION_NOISE:
        name = _pick(rng, FASHION_CONFUSABLE[name])
    if rng.random() < 0.15:
        name = _pick(rng, FASHION_SYNONYMS[name])
    return _pick(rng, _FASHION_TEMPLATES).format(name)


# --------------------------------------------------------------------------------------------
# Version 2 (``Bench-RN-S``): captions come from *sources*, each with its own wording, as alt-text
# does. The careful sources (clip-art sites, shop listings, tags, plain descriptions) name the
# main object as version 1 does. The careless ones word their captions like a snapshot ("a
# photo of ...", "a picture of ...") and name things with the commoner, coarser word
# (``COARSE_COLORS``, ``COARSE_SHAPES``: orange and pink things are "red", a hexagon or an ellipse
# is a "circle", a diamond a "square") at ``CARELESS_COARSE`` for each of colour and shape. A text
# tower trained on such captions learns that after "a photo of a" a name stands for a spread of
# objects around it: the hand-crafted prompt ("a photo of a {}.") is a blurrier, biased
# classifier than the careful sources' wording ("clip art of a {}."), and a context learnt from
# a few labelled images can find a better one (``tests/learnable_world.py`` measures the same
# mechanism at toy scale, with background colours). Everything else (partial captions, version
# 1's slips, distractors, empty captions) is version 1's.
# --------------------------------------------------------------------------------------------

CARELESS_SHARE = 0.5  # share of (non-empty) world captions that come from a careless source
CARELESS_COARSE = 0.8
COARSE_COLORS = {"orange": "red", "pink": "red", "purple": "blue", "cyan": "blue", "brown": "orange"}
COARSE_SHAPES = {"hexagon": "circle", "ellipse": "circle", "ring": "circle", "pentagon": "hexagon",
                 "diamond": "square", "rectangle": "square", "cross": "star"}
_CARELESS = ("a photo of {}.", "a picture of {}.", "a photo of {}.", "a good photo of {}.",
             "a close-up photo of {}.", "there is {} in the picture.", "an image of {}.")
_CAREFUL = ("{}.", "clip art of {}.", "{} icon.", "a rendering of {}.", "{} sticker.",
            "vector drawing of {}.", "{}, isolated.", "{} shape.")


def world_caption_v2(rng: np.random.Generator, color: str, shape: str, pattern: str, style: str,
                     size: float, distractors: list[tuple[str, str]], background_color: str,
                     background: str = "solid") -> str:
    """One caption (version 2) of a scene whose main object has the given attributes
    (``background``, the background's kind, is accepted for future versions and unused)."""
    return _world_sourced(rng, color, shape, pattern, style, size, distractors, background_color,
                          CARELESS_SHARE, CARELESS_COARSE)


def _world_sourced(rng, color, shape, pattern, style, size, distractors, background_color,
                   careless_share: float, careless_coarse: float) -> str:
    if rng.random() < EMPTY_CAPTION:
        return _pick(rng, _EMPTY)
    if distractors and rng.random() < WRONG_OBJECT:
        color, shape = distractors[int(rng.integers(len(distractors)))]
        pattern, size = "solid", size * 0.6
    careless = rng.random() < careless_share
    if careless:
        if color in COARSE_COLORS and rng.random() < careless_coarse:
            color = COARSE_COLORS[color]
        if shape in COARSE_SHAPES and rng.random() < careless_coarse:
            shape = COARSE_SHAPES[shape]
    np_main = object_phrase(rng, color, shape, pattern, size)
    if _STYLE[style] and rng.random() < 0.55:
        return _pick(rng, _STYLE[style]).format(np_main)
    if careless:
        return _pick(rng, _CARELESS).format(np_main)
    if rng.random() < 0.75 or not distractors:
        if rng.random() < 0.12:
            return f"{np_main} on {article(background_color, rng)} {background_color} background."
        return _pick(rng, _CAREFUL).format(np_main)
    dc, ds = distractors[int(rng.integers(len(distractors)))]
    np_other = object_phrase(rng, dc, ds, "solid", size * 0.6)
    return _pick(rng, ("{} and {}.", "{} next to {}.", "clip art of {} and {}.", "{} with {} nearby.")).format(
        np_main, np_other)


# --------------------------------------------------------------------------------------------
# Version 3: version 2 with careless sources more common (``V3_CARELESS_SHARE`` of the world
# captions) and always coarse, and the same two kinds of source for Fashion-MNIST: careless ones
# ("a photo of a ...", "a picture of a ...") call garments by a coarser class name
# (``COARSE_GARMENTS``), careful ones (product listings) name them as version 1 does.
# --------------------------------------------------------------------------------------------

V3_CARELESS_SHARE, V3_CARELESS_COARSE = 0.8, 1.0
COARSE_GARMENTS = {"t-shirt": "shirt", "pullover": "coat", "sandal": "sneaker", "ankle boot": "sneaker"}
_FASHION_CARELESS = ("a photo of a {}.", "a picture of a {}.", "a photo of a {}.", "a good photo of a {}.")
_FASHION_CAREFUL = ("a {}.", "{}.", "a grayscale product photo of a {}.", "product shot: {}.",
                    "a {}, a type of clothing.", "{} for sale.", "a black and white {}.")


def world_caption_v3(rng: np.random.Generator, color: str, shape: str, pattern: str, style: str,
                     size: float, distractors: list[tuple[str, str]], background_color: str,
                     background: str = "solid") -> str:
    """One caption (version 3) of a scene whose main object has the given attributes."""
    return _world_sourced(rng, color, shape, pattern, style, size, distractors, background_color,
                          V3_CARELESS_SHARE, V3_CARELESS_COARSE)


def fashion_caption_v3(rng: np.random.Generator, name: str) -> str:
    """One caption (version 3) of a Fashion-MNIST image of class ``name``."""
    if rng.random() < EMPTY_CAPTION:
        return _pick(rng, _EMPTY)
    careless = rng.random() < V3_CARELESS_SHARE
    if careless and name in COARSE_GARMENTS:
        name = COARSE_GARMENTS[name]
    if rng.random() < FASHION_NOISE:
        name = _pick(rng, FASHION_CONFUSABLE[name])
    if rng.random() < 0.15:
        name = _pick(rng, FASHION_SYNONYMS[name])
    return _pick(rng, _FASHION_CARELESS if careless else _FASHION_CAREFUL).format(name)


# --------------------------------------------------------------------------------------------
# Versions. Version 1 is ``world_caption`` / ``fashion_caption`` above (``Bench-RN-T`` was
# pretrained on it; it never changes). A later version is added beside it and chosen by number
# (``Recipe.caption_version`` of ``staged.py``), never by editing an earlier one. Every version's
# world function takes version 2's arguments (version 1 ignores ``background``).
# --------------------------------------------------------------------------------------------

def _world_v1(rng, color, shape, pattern, style, size, distractors, background_color, background="solid"):
    return world_caption(rng, color, shape, pattern, style, size, distractors, background_color)


WORLD_CAPTIONS = {1: _world_v1, 2: world_caption_v2, 3: world_caption_v3}
FASHION_CAPTIONS = {1: fashion_caption, 2: fashion_caption, 3: fashion_caption_v3}


def world_caption_version(version: int):
    """The world-caption function of a caption version (``world_caption_v2``'s signature)."""
    try:
        return WORLD_CAPTIONS[version]
    except KeyError:
        raise ValueError(f"unknown caption version {version}; known: {sorted(WORLD_CAPTIONS)}") from None


def fashion_caption_version(version: int):
    """The Fashion-MNIST caption function of a caption version (``fashion_caption``'s signature)."""
    try:
        return FASHION_CAPTIONS[version]
    except KeyError:
        raise ValueError(f"unknown caption version {version}; known: {sorted(FASHION_CAPTIONS)}") from None
