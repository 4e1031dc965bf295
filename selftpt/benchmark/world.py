"""ShapeWorld: a procedurally generated image world with compositional class names.

Every image shows one *main* object (the labelled one: the largest object in the scene) of
a colour, a shape and a fill pattern, e.g. a "striped red triangle", among nuisances that make
the world hard the way photographs are hard: random backgrounds (solid, gradient, blotchy,
striped), position, scale and rotation, per-instance colour jitter (so "orange" and "red"
overlap at the edges), smaller distractor objects (sometimes in front, occluding the main
one), occluding bars, pixel noise and blur.

Rendering *styles* give domain shifts of the same classes (``photo`` is the clean world;
``sketch``, ``noisy``, ``pastel`` and ``clutter`` are the shifted renderings used as
domain-generalisation targets).

Everything is vectorised numpy, deterministic from a seed (numpy's PCG64 ``Generator``), and
independent of any image library: scenes are rendered at 2x resolution with exact inside
tests and box-filtered down, which anti-aliases edges. ``render_scenes`` draws a batch of
scenes from a ``SceneSampler``; ``WORLD_VERSION`` changes whenever the rendering of a seed
changes (cached datasets and the pretrained backbone are tied to it).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

WORLD_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

# Colour name -> (hue in degrees, saturation, value); each instance is jittered around it.
# Hue jitter is wide enough that neighbouring names (red/orange, blue/cyan, purple/pink) meet:
# a fine-grained distinction, as with real colour words.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.85, 0.85),
    "orange": (28.0, 0.9, 0.95),
    "yellow": (55.0, 0.85, 0.95),
    "green": (125.0, 0.75, 0.7),
    "cyan": (185.0, 0.75, 0.85),
    "blue": (225.0, 0.8, 0.85),
    "purple": (280.0, 0.65, 0.7),
    "pink": (330.0, 0.45, 0.95),
    "brown": (25.0, 0.7, 0.45),
    "gray": (0.0, 0.0, 0.55),
    "white": (0.0, 0.0, 0.97),
    "black": (0.0, 0.0, 0.08),
}
_HUE_JITTER, _SAT_JITTER, _VAL_JITTER = 14.0, 0.12, 0.12

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart", "cross", "hexagon", "crescent",
    "diamond", "pentagon", "ring", "arrow", "ellipse", "rectangle",
)
# Shapes whose identity depends on orientation (a square turned 45 degrees is a diamond)
# only rotate a little; the others rotate freely.
_SMALL_ROTATION = {"square", "diamond", "cross", "rectangle", "heart"}

PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")

# ``clean``: a large object, seldom a distractor, no occluder, little noise (product-photo-like;
# part of the pretraining mix, as the web has clean pictures too).
STYLES: tuple[str, ...] = ("photo", "clean", "sketch", "noisy", "pastel", "clutter")

# Confusable words, used by the caption noise (a human labeller's typical slips).
SIMILAR_COLORS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "pink"), "orange": ("red", "yellow", "brown"), "yellow": ("orange",),
    "green": ("cyan",), "cyan": ("blue", "green"), "blue": ("cyan", "purple"),
    "purple": ("blue", "pink"), "pink": ("purple", "red"), "brown": ("orange", "red"),
    "gray": ("white", "black"), "white": ("gray",), "black": ("gray",),
}
SIMILAR_SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("hexagon", "ellipse"), "square": ("rectangle", "diamond"),
    "triangle": ("arrow",), "star": ("cross",), "heart": ("circle",), "cross": ("star",),
    "hexagon": ("pentagon", "circle"), "crescent": ("ring",), "diamond": ("square",),
    "pentagon": ("hexagon",), "ring": ("circle",), "arrow": ("triangle",),
    "ellipse": ("circle",), "rectangle": ("square",),
}


def color_rgb(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` jittered RGB instances (float32 in [0, 1], shape (n, 3)) of a colour name."""
    h, s, v = COLORS[name]
    hue = (h + rng.uniform(-_HUE_JITTER, _HUE_JITTER, n)) / 360.0 % 1.0
    sat = np.clip(s + rng.uniform(-_SAT_JITTER, _SAT_JITTER, n), 0, 1) if s > 0 else rng.uniform(0, 0.08, n)
    val = np.clip(v + rng.uniform(-_VAL_JITTER, _VAL_JITTER, n), 0, 1)
    return np.array([colorsys.hsv_to_rgb(*t) for t in zip(hue, sat, val)], np.float32).reshape(n, 3)


# ---------------------------------------------------------------------------------------------
# Shapes: exact inside tests in object coordinates (u right, v up, circumradius ~1)
# ---------------------------------------------------------------------------------------------

def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    theta = np.arctan2(v, u) - np.pi / 2  # a vertex points up
    sector = 2 * np.pi / n
    phi = np.mod(theta, sector) - sector / 2
    return np.hypot(u, v) * np.cos(phi) <= np.cos(np.pi / n)


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    sector = 2 * np.pi / points
    theta = np.arctan2(v, u) - np.pi / 2 - sector / 2  # inner vertex at phi = 0
    phi = np.abs(np.mod(theta, sector) - sector / 2)  # fold into one half-sector
    r = np.hypot(u, v)
    qx, qy = r * np.cos(phi), r * np.sin(phi)
    p1x, p1y = inner, 0.0
    p2x, p2y = np.cos(sector / 2), np.sin(sector / 2)
    return (p2x - p1x) * (qy - p1y) - (p2y - p1y) * (qx - p1x) >= 0


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 0.92
    if shape == "square":
        return np.maximum(au, av) <= 0.78
    if shape == "rectangle":
        return (au <= 1.0) & (av <= 0.5)
    if shape == "diamond":
        return au + av <= 1.05
    if shape == "triangle":
        w = v + 0.1  # centre the triangle's area
        return (w >= -0.55) & (w <= 1.05 - 1.732 * au)
    if shape == "pentagon":
        return _regular_polygon(u, v, 5)
    if shape == "hexagon":
        return _regular_polygon(u, v, 6)
    if shape == "star":
        return _star(u * 0.95, v * 0.95 + 0.03)
    if shape == "heart":
        x, y = u * 1.15, v * 1.15 + 0.1
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "crescent":
        return (u * u + v * v <= 0.95) & ((u - 0.42) ** 2 + (v - 0.1) ** 2 > 0.62)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.95) & (r2 >= 0.33)
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "arrow":
        shaft = (u >= -1.0) & (u <= 0.15) & (av <= 0.2)
        head = (u >= 0.05) & (u <= 1.0) & (av <= 0.65 * (1.0 - u) / 0.95)
        return shaft | head
    raise KeyError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

@dataclass
class ObjectTable:
    """Objects of a batch of scenes, one row per object (columns are arrays)."""

    image: np.ndarray  # (m,) index of the scene the object belongs to
    layer: np.ndarray  # (m,) drawing order within its scene (higher = in front)
    shape: list[str]
    rgb: np.ndarray  # (m, 3) fill colour
    rgb2: np.ndarray  # (m, 3) second colour of the fill pattern
    pattern: list[str]
    pattern_period: np.ndarray  # (m,) in image fractions
    pattern_angle: np.ndarray  # (m,) radians
    cx: np.ndarray  # (m,) centre, image fractions
    cy: np.ndarray
    size: np.ndarray  # (m,) circumradius, image fractions
    angle: np.ndarray  # (m,) rotation, radians
    outline: np.ndarray  # (m,) bool: draw the stroke only (sketch style)


@dataclass
class SceneBatch:
    """What ``SceneSampler.sample`` draws: main-object attributes plus everything to render."""

    color: list[str]  # main object's colour name per scene
    shape: list[str]
    pattern: list[str]
    style: list[str]
    size: np.ndarray  # main object's circumradius
    distractors: list[list[tuple[str, str]]]  # (colour, shape) of each distractor per scene
    background: list[str]  # background kind per scene
    background_color: list[str]  # nearest colour name of the background
    objects: ObjectTable
    post: dict[str, np.ndarray] = field(default_factory=dict)  # per-scene post-processing


_STYLE_PARAMS = {
    # distractor count probabilities (0..5), occluder prob, noise std range, blur prob,
    # main-object size range
    "photo": dict(n_distract=(0.3, 0.35, 0.25, 0.1, 0, 0), occlude=0.2, noise=(0.0, 0.07),
                  blur=0.25, size=(0.17, 0.34)),
    "clean": dict(n_distract=(0.75, 0.25, 0, 0, 0, 0), occlude=0.0, noise=(0.0, 0.02),
                  blur=0.1, size=(0.24, 0.4)),
    "sketch": dict(n_distract=(0.45, 0.35, 0.2, 0, 0, 0), occlude=0.0, noise=(0.0, 0.03),
                   blur=0.1, size=(0.2, 0.36)),
    "noisy": dict(n_distract=(0.3, 0.35, 0.25, 0.1, 0, 0), occlude=0.2, noise=(0.1, 0.17),
                  blur=0.5, size=(0.17, 0.34)),
    "pastel": dict(n_distract=(0.3, 0.35, 0.25, 0.1, 0, 0), occlude=0.2, noise=(0.0, 0.05),
                   blur=0.2, size=(0.17, 0.34)),
    "clutter": dict(n_distract=(0, 0, 0.2, 0.4, 0.3, 0.1), occlude=0.6, noise=(0.02, 0.08),
                    blur=0.25, size=(0.15, 0.28)),
}
BACKGROUNDS = ("solid", "gradient", "blotchy", "striped")


def _nearest_color_name(rgb: np.ndarray) -> str:
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if v < 0.2:
        return "black"
    if s < 0.18:
        return "white" if v > 0.8 else "gray"
    best, dist = "gray", 1e9
    for name, (ch, cs, cv) in COLORS.items():
        if cs == 0:
            continue
        dh = min(abs(h * 360 - ch), 360 - abs(h * 360 - ch)) / 180
        d = dh * dh * 4 + (s - cs) ** 2 + (v - cv) ** 2
        if d < dist:
            best, dist = name, d
    return best


@dataclass
class SceneSampler:
    """Draws scenes whose main object comes from a given distribution of attributes.

    Args:
        color_choices: colour names the main object may take (ignored where ``colors`` fixes it).
        shape_choices / pattern_choices: likewise for shape and fill pattern.
        distractor_pairs: (colour, shape) pairs allowed for distractor objects; ``None`` = any.
        pattern_prob: probability that a free pattern is not ``solid`` (nuisance texture).
        excluded_pairs: (colour, shape) and (pattern, shape) pairs no distractor may show
            (pretraining keeps its unseen combinations out of every image).
    """

    color_choices: Sequence[str] = tuple(COLORS)
    shape_choices: Sequence[str] = SHAPES
    pattern_choices: Sequence[str] = PATTERNS
    distractor_pairs: Sequence[tuple[str, str]] | None = None
    pattern_prob: float = 0.35
    excluded_pairs: frozenset = frozenset()

    def sample(self, rng: np.random.Generator, n: int, *, colors: Sequence[str | None] | None = None,
               shapes: Sequence[str | None] | None = None, patterns: Sequence[str | None] | None = None,
               styles: Sequence[str] | str = "photo", min_size: float = 0.0) -> SceneBatch:
        """Draw ``n`` scenes; per-scene attributes given as ``None`` are drawn at random.

        Args:
            rng: the source of all randomness.
            n: number of scenes.
            colors, shapes, patterns: per-scene main-object attributes (or None to draw).
            styles: one style for all scenes or one per scene.
            min_size: lower bound on the main object's circumradius (e.g. so patterns show).
        """
        colors = list(colors) if colors is not None else [None] * n
        shapes = list(shapes) if shapes is not None else [None] * n
        patterns = list(patterns) if patterns is not None else [None] * n
        styles = [styles] * n if isinstance(styles, str) else list(styles)
        colors = [c or self.color_choices[rng.integers(len(self.color_choices))] for c in colors]
        shapes = [s or self.shape_choices[rng.integers(len(self.shape_choices))] for s in shapes]
        patterns = [
            p if p is not None else (
                "solid" if rng.random() >= self.pattern_prob or styles[i] == "sketch"
                else [q for q in self.pattern_choices if q != "solid"][rng.integers(len(self.pattern_choices) - 1)]
            )
            for i, p in enumerate(patterns)
        ]

        rows: dict[str, list] = {k: [] for k in ObjectTable.__dataclass_fields__}
        sizes = np.empty(n, np.float32)
        distractors: list[list[tuple[str, str]]] = []
        backgrounds: list[str] = []
        bg_names: list[str] = []
        post = {k: np.zeros(n, np.float32) for k in ("noise", "blur", "pastel", "tint_r", "tint_g", "tint_b")}
        post["bg"] = np.zeros((n, 2, 3), np.float32)  # two background colours
        post["bg_kind"] = np.zeros(n, np.int64)
        post["bg_param"] = np.zeros((n, 3), np.float32)
        post["occluder"] = np.zeros((n, 8), np.float32)  # on, x0, y0, x1, y1, r, g, b

        for i in range(n):
            style = styles[i]
            prm = _STYLE_PARAMS[style]
            outline = style == "sketch"
            size = max(rng.uniform(*prm["size"]), min_size)
            sizes[i] = size
            margin = size * 0.9
            cx, cy = rng.uniform(margin, 1 - margin, 2) if margin < 0.5 else (0.5, 0.5)
            k = int(rng.choice(6, p=np.array(prm["n_distract"]) / sum(prm["n_distract"])))
            main_layer = int(rng.integers(0, k + 1)) if rng.random() < 0.3 else k
            objs = [(colors[i], shapes[i], patterns[i], cx, cy, size, main_layer)]
            dl = []
            for layer in (other for other in range(k + 1) if other != main_layer):
                while True:
                    if self.distractor_pairs is not None:
                        dc, ds = self.distractor_pairs[rng.integers(len(self.distractor_pairs))]
                    else:
                        dc = list(COLORS)[rng.integers(len(COLORS))]
                        ds = SHAPES[rng.integers(len(SHAPES))]
                    dp = "solid" if rng.random() > 0.2 or outline else PATTERNS[1 + rng.integers(3)]
                    if (dc, ds) not in self.excluded_pairs and (dp, ds) not in self.excluded_pairs:
                        break
                dsize = size * rng.uniform(0.35, 0.9 if style == "clutter" else 0.7)
                dx, dy = rng.uniform(dsize * 0.5, 1 - dsize * 0.5, 2)
                objs.append((dc, ds, dp, dx, dy, dsize, layer))
                dl.append((dc, ds))
            distractors.append(dl)
            for c, s, p, x, y, sz, layer in objs:
                rgb = color_rgb(c, rng, 1)[0]
                shade = rng.uniform(0.45, 0.7) if rng.random() < 0.5 else -rng.uniform(0.35, 0.6)
                rgb2 = rgb * (1 - shade) if shade > 0 else rgb + (1 - rgb) * (-shade)
                if c in ("black",):
                    rgb2 = rgb + (1 - rgb) * rng.uniform(0.35, 0.6)
                rot = np.pi / 9 if s in _SMALL_ROTATION else np.pi
                rows["image"].append(i)
                rows["layer"].append(layer)
                rows["shape"].append(s)
                rows["rgb"].append(rgb)
                rows["rgb2"].append(rgb2)
                rows["pattern"].append(p)
                rows["pattern_period"].append(rng.uniform(0.1, 0.16))
                rows["pattern_angle"].append(rng.uniform(0, np.pi))
                rows["cx"].append(x)
                rows["cy"].append(y)
                rows["size"].append(sz)
                rows["angle"].append(rng.uniform(-rot, rot))
                rows["outline"].append(outline)

            # background
            if outline:
                kind = 0
                paper = rng.uniform(0.85, 1.0)
                bg = np.array([[paper] * 3, [paper * 0.95] * 3], np.float32)
            else:
                kind = int(rng.choice(4, p=[0.35, 0.25, 0.25, 0.15]))
                bg = np.empty((2, 3), np.float32)
                for t in range(2):
                    sat = rng.uniform(0, 0.35) if rng.random() < 0.7 else rng.uniform(0.35, 0.8)
                    bg[t] = colorsys.hsv_to_rgb(rng.random(), sat, rng.uniform(0.15, 1.0))
                if kind == 3:  # striped backgrounds have low contrast
                    bg[1] = bg[0] * rng.uniform(0.75, 0.9)
            backgrounds.append("solid" if outline else BACKGROUNDS[kind])
            bg_names.append(_nearest_color_name(bg[0]))
            post["bg"][i] = bg
            post["bg_kind"][i] = kind
            post["bg_param"][i] = (rng.uniform(0, 2 * np.pi), rng.uniform(0.08, 0.2), rng.integers(1 << 30))
            post["noise"][i] = rng.uniform(*prm["noise"])
            post["blur"][i] = float(rng.random() < prm["blur"])
            if style == "pastel":
                post["pastel"][i] = rng.uniform(0.35, 0.55)
                tint = rng.uniform(0.85, 1.0, 3)
                post["tint_r"][i], post["tint_g"][i], post["tint_b"][i] = tint
            else:
                post["tint_r"][i] = post["tint_g"][i] = post["tint_b"][i] = 1.0
            if rng.random() < prm["occlude"]:
                # a bar across part of the main object
                horiz = rng.random() < 0.5
                w = size * rng.uniform(0.35, 0.7)
                off = rng.uniform(-size * 0.8, size * 0.8)
                if horiz:
                    box = (cx - 1.5 * size, cy + off - w / 2, cx + rng.uniform(-0.3, 1.5) * size, cy + off + w / 2)
                else:
                    box = (cx + off - w / 2, cy - 1.5 * size, cx + off + w / 2, cy + rng.uniform(-0.3, 1.5) * size)
                rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.9))
                post["occluder"][i] = (1, *box, *rgb)

        table = ObjectTable(
            image=np.asarray(rows["image"]), layer=np.asarray(rows["layer"]), shape=rows["shape"],
            rgb=np.asarray(rows["rgb"], np.float32), rgb2=np.clip(np.asarray(rows["rgb2"], np.float32), 0, 1),
            pattern=rows["pattern"], pattern_period=np.asarray(rows["pattern_period"], np.float32),
            pattern_angle=np.asarray(rows["pattern_angle"], np.float32),
            cx=np.asarray(rows["cx"], np.float32), cy=np.asarray(rows["cy"], np.float32),
            size=np.asarray(rows["size"], np.float32), angle=np.asarray(rows["angle"], np.float32),
            outline=np.asarray(rows["outline"], bool),
        )
        return SceneBatch(color=colors, shape=shapes, pattern=patterns, style=styles, size=sizes,
                          distractors=distractors, background=backgrounds, background_color=bg_names,
                          objects=table, post=post)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res, dtype=np.float32) + 0.5) / res
    return np.meshgrid(c, c, indexing="xy")  # x (right), y (down)


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for d in range(1, k + 1):
        out[:, d:, :] &= mask[:, :-d, :]
        out[:, :-d, :] &= mask[:, d:, :]
        out[:, :, d:] &= mask[:, :, :-d]
        out[:, :, :-d] &= mask[:, :, d:]
    return out


def _backgrounds(post: dict[str, np.ndarray], gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    n = len(post["bg_kind"])
    res = gx.shape[0]
    bg = post["bg"]  # (n, 2, 3)
    canvas = np.broadcast_to(bg[:, 0, None, None, :], (n, res, res, 3)).copy()
    ang, period, seed = post["bg_param"][:, 0], post["bg_param"][:, 1], post["bg_param"][:, 2]
    kind = post["bg_kind"]
    idx = np.flatnonzero(kind == 1)  # gradient
    if idx.size:
        t = (np.cos(ang[idx])[:, None, None] * (gx - 0.5) + np.sin(ang[idx])[:, None, None] * (gy - 0.5)) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        canvas[idx] = bg[idx, 0, None, None, :] * (1 - t) + bg[idx, 1, None, None, :] * t
    idx = np.flatnonzero(kind == 2)  # blotchy: smooth random field between the two colours
    if idx.size:
        for i in idx:
            g = np.random.default_rng(int(seed[i])).random((5, 5)).astype(np.float32)
            up = np.kron(g, np.ones((res // 4, res // 4), np.float32))[:res, :res]
            # smooth the blocks
            for _ in range(2):
                up = (up + np.roll(up, 3, 0) + np.roll(up, -3, 0) + np.roll(up, 3, 1) + np.roll(up, -3, 1)) / 5
            t = up[..., None]
            canvas[i] = bg[i, 0] * (1 - t) + bg[i, 1] * t
    idx = np.flatnonzero(kind == 3)  # striped
    if idx.size:
        proj = np.cos(ang[idx])[:, None, None] * gx + np.sin(ang[idx])[:, None, None] * gy
        on = (np.sin(2 * np.pi * proj / period[idx, None, None]) > 0)[..., None]
        canvas[idx] = np.where(on, bg[idx, 1, None, None, :], bg[idx, 0, None, None, :])
    return canvas


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, period: np.ndarray,
                  angle: np.ndarray) -> np.ndarray:
    p = period[:, None, None]
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    if pattern == "striped":
        return np.mod((ca * x + sa * y) / p, 1.0) < 0.5
    if pattern == "dotted":
        fx, fy = np.mod(x / p, 1.0) - 0.5, np.mod(y / p, 1.0) - 0.5
        return fx * fx + fy * fy > 0.3 ** 2  # dots in the second colour
    if pattern == "checkered":
        return (np.floor(x / p) + np.floor(y / p)) % 2 == 0
    return np.ones_like(x, bool)


def render_scenes(batch: SceneBatch, resolution: int = 32, supersample: int = 2) -> np.ndarray:
    """Render a batch of scenes to uint8 RGB images of shape (n, resolution, resolution, 3).

    Each image depends only on its own scene (its pixel noise comes from a per-scene seed), so
    scenes can be rendered in batches of any size and composition with identical results.

    Args:
        batch: scenes drawn by ``SceneSampler.sample`` (or several joined by ``concat_batches``).
        resolution: output side in pixels.
        supersample: render at this multiple and box-filter down (anti-aliasing).
    """
    n = len(batch.color)
    res = resolution * supersample
    gx, gy = _grid(res)
    canvas = _backgrounds(batch.post, gx, gy)
    obj = batch.objects
    stroke = max(1, int(round(res / 32 * 1.3)))
    for layer in range(int(obj.layer.max()) + 1 if len(obj.layer) else 0):
        for shape in sorted(set(obj.shape)):
            sel = np.flatnonzero((obj.layer == layer) & (np.asarray(obj.shape) == shape))
            if sel.size == 0:
                continue
            dx = gx[None] - obj.cx[sel, None, None]
            dy = gy[None] - obj.cy[sel, None, None]
            ca, sa = np.cos(obj.angle[sel])[:, None, None], np.sin(obj.angle[sel])[:, None, None]
            s = obj.size[sel, None, None]
            u = (ca * dx + sa * dy) / s
            v = -(-sa * dx + ca * dy) / s  # v points up
            mask = _inside(shape, u, v)
            out = obj.outline[sel]
            if out.any():
                mask[out] &= ~_erode(mask[out], stroke)
            col = np.broadcast_to(obj.rgb[sel, None, None, :], mask.shape + (3,))
            pats = [obj.pattern[i] for i in sel]
            if any(p != "solid" for p in pats):
                col = col.copy()
                for p in set(pats) - {"solid"}:
                    k = np.flatnonzero(np.asarray(pats) == p)
                    pm = _pattern_mask(p, gx[None], gy[None],
                                       obj.pattern_period[sel[k]], obj.pattern_angle[sel[k]])
                    col[k] = np.where(pm[..., None], obj.rgb[sel[k], None, None, :], obj.rgb2[sel[k], None, None, :])
            img = obj.image[sel]
            canvas[img] = np.where(mask[..., None], col, canvas[img])
    post = batch.post
    occ = post["occluder"]
    for i in np.flatnonzero(occ[:, 0] > 0):
        x0, y0, x1, y1 = occ[i, 1:5]
        m = (gx >= min(x0, x1)) & (gx <= max(x0, x1)) & (gy >= min(y0, y1)) & (gy <= max(y0, y1))
        canvas[i][m] = occ[i, 5:8]
    # box-filter down to the output resolution
    canvas = canvas.reshape(n, resolution, supersample, resolution, supersample, 3).mean(axis=(2, 4))
    blur = post["blur"] > 0
    if blur.any():
        c = canvas[blur]
        c = (2 * c + np.roll(c, 1, 1) + np.roll(c, -1, 1) + np.roll(c, 1, 2) + np.roll(c, -1, 2)) / 6
        canvas[blur] = c
    pastel = post["pastel"] > 0
    if pastel.any():
        a = post["pastel"][pastel, None, None, None]
        tint = np.stack([post["tint_r"], post["tint_g"], post["tint_b"]], 1)[pastel, None, None, :]
        # washed-out colours under a tinted light, on a darkened background
        canvas[pastel] = (canvas[pastel] * (1 - a) + a) * tint
    noisy = post["noise"] > 0
    if noisy.any():
        for i in np.flatnonzero(noisy):
            gen = np.random.default_rng([int(post["bg_param"][i, 2]), 1])
            canvas[i] += gen.standard_normal(canvas[i].shape, dtype=np.float32) * post["noise"][i]
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)


def concat_batches(batches: Sequence[SceneBatch]) -> SceneBatch:
    """Join scene batches into one (for rendering many small batches in one call)."""
    offsets = np.cumsum([0] + [len(b.color) for b in batches[:-1]])
    objs = [b.objects for b in batches]
    cat = lambda name: np.concatenate([getattr(o, name) for o in objs])  # noqa: E731
    table = ObjectTable(
        image=np.concatenate([o.image + off for o, off in zip(objs, offsets)]), layer=cat("layer"),
        shape=[s for o in objs for s in o.shape], rgb=cat("rgb"), rgb2=cat("rgb2"),
        pattern=[p for o in objs for p in o.pattern], pattern_period=cat("pattern_period"),
        pattern_angle=cat("pattern_angle"), cx=cat("cx"), cy=cat("cy"), size=cat("size"),
        angle=cat("angle"), outline=cat("outline"),
    )
    joined = lambda name: [x for b in batches for x in getattr(b, name)]  # noqa: E731
    return SceneBatch(
        color=joined("color"), shape=joined("shape"), pattern=joined("pattern"), style=joined("style"),
        size=np.concatenate([b.size for b in batches]), distractors=joined("distractors"),
        background=joined("background"), background_color=joined("background_color"), objects=table,
        post={k: np.concatenate([b.post[k] for b in batches]) for k in batches[0].post},
    )
