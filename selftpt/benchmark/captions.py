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
