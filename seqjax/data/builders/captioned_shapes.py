"""`captioned_shapes`: small RGB images of one digit or shape each, with a caption and class labels, for a Vision
Transformer (classify `shape`) and a text-to-image model (`caption` -> `image`).

Each image is `image_size` x `image_size` (default 32) uint8 RGB on a black background, with one object drawn in one
flat palette colour (no anti-aliasing: every non-background pixel is exactly `COLOURS[colour]`). The object is one
of `SHAPES` -- the digits "0".."9" from a 5x7 bitmap font, or a circle, square or (equilateral, apex up) triangle --
at one of two `SIZES`, lying entirely inside one of four quadrants (`POSITIONS`), rotated by `rotation` degrees
counter-clockwise (uniform in [-max_rotation, max_rotation]; +-30 by default, so that a 6 never looks like a 9).
Within its size class the scale varies continuously, and within its quadrant the position varies continuously.

The caption names the labels: "a small red 7 in the top left", "a large blue circle in the bottom right"
(`caption`, and `parse_caption` back). Everything is drawn in numpy by `render`, a pure function: implicit functions
of the pixel centres for the shapes, and for the digits the font read through the inverse rotation (bilinearly
between cell centres, then thresholded, so that rotated diagonal strokes stay connected). A build is offline,
deterministic from the config's seed and fast (tens of microseconds per image).

Features: image uint8 [S, S, 3]; caption text (bytes when read back); shape, colour, size, position class labels;
rotation float32 degrees.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import tensorflow_datasets as tfds

from seqjax.data.builders.seeded import SeededBuilder, SeededConfig

SHAPES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "circle", "square", "triangle")
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (0, 0, 0)

# 5 columns x 7 rows per digit, '#' lit.
_FONT = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
_GLYPH_W, _GLYPH_H = 5, 7
_GLYPHS = np.array([[[c == "#" for c in row] for row in _FONT[str(d)]] for d in range(10)], dtype=bool)  # [10,7,5]
# The font is read by bilinear interpolation between cell centres, thresholded: strokes come out a little over one
# cell wide (1.2 cells at 0.4), and cells that touch only at a corner (diagonal strokes) stay connected when rotated,
# which nearest sampling does not give. Lit pixels lie within _GLYPH_PAD = 0.5 - threshold cells of the 5x7 box.
_GLYPH_THRESHOLD = 0.4
_GLYPH_PAD = 0.5 - _GLYPH_THRESHOLD
_GLYPHS_PADDED = np.pad(_GLYPHS.astype(np.float64), ((0, 0), (1, 1), (1, 1)))  # [10, 9, 7]

# Scale `s` (pixels per font cell, for a 32-pixel image) ranges of the two size classes. The shapes are sized in the
# same unit: circle radius, square half-side and triangle circumradius, in cells. The large range is as big as a
# quadrant allows at any rotation (the digit's circumradius, sqrt(2.6^2 + 3.6^2) * 1.8 = 7.99 < 8 pixels).
_SCALE_RANGE = ((1.15, 1.35), (1.6, 1.8))
_CIRCLE_R, _SQUARE_A, _TRIANGLE_R = 3.4, 2.9, 4.2
_MARGIN = 1e-3  # keeps pixel centres strictly inside the quadrant despite rounding

_CAPTION_RE = re.compile(
    r"^a (?P<size>{}) (?P<colour>{}) (?P<shape>{}) in the (?P<position>{})$".format(
        *("|".join(map(re.escape, names)) for names in (SIZES, COLOURS, SHAPES, POSITIONS))
    )
)


def caption(shape: int, colour: int, size: int, position: int) -> str:
    """The caption of an object's labels, e.g. "a small red 7 in the top left"."""
    return f"a {SIZES[size]} {list(COLOURS)[colour]} {SHAPES[shape]} in the {POSITIONS[position]}"


def parse_caption(text: str | bytes) -> dict[str, int]:
    """The labels a caption names: {"shape", "colour", "size", "position"} -> class index. ValueError if malformed."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    match = _CAPTION_RE.match(text)
    if match is None:
        raise ValueError(f"not a captioned_shapes caption: {text!r}")
    return {
        "shape": SHAPES.index(match["shape"]),
        "colour": list(COLOURS).index(match["colour"]),
        "size": SIZES.index(match["size"]),
        "position": POSITIONS.index(match["position"]),
    }


@functools.lru_cache(maxsize=8)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x right, y down), [S, S] each; pixel (i, j) covers [j, j+1] x [i, i+1]."""
    centres = np.arange(image_size, dtype=np.float64) + 0.5
    x, y = np.meshgrid(centres, centres)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _glyph_value(digit: int, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """The digit's bitmap bilinearly interpolated at glyph coordinates (cell (row, col) centred at (col, row));
    zero from one cell outside the glyph on."""
    glyph = _GLYPHS_PADDED[digit]
    gx = np.clip(gx, -1.0, float(_GLYPH_W))
    gy = np.clip(gy, -1.0, float(_GLYPH_H))
    x0 = np.clip(np.floor(gx), -1, _GLYPH_W - 1)
    y0 = np.clip(np.floor(gy), -1, _GLYPH_H - 1)
    fx, fy = gx - x0, gy - y0
    ix, iy = x0.astype(np.int64) + 1, y0.astype(np.int64) + 1  # indices into the padded bitmap
    top = glyph[iy, ix] * (1 - fx) + glyph[iy, ix + 1] * fx
    bottom = glyph[iy + 1, ix] * (1 - fx) + glyph[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _hull(shape: int, s: float) -> np.ndarray:
    """Vertices [n, 2] (object frame: x right, y down, centred on the object) of a polygon containing it."""
    if shape < 10:
        w, h = (_GLYPH_W / 2 + _GLYPH_PAD) * s, (_GLYPH_H / 2 + _GLYPH_PAD) * s
        return np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
    if shape == 11:
        a = _SQUARE_A * s
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    r = _TRIANGLE_R * s  # the triangle, apex up
    angles = np.deg2rad([-90.0, 30.0, 150.0])
    return r * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def render_mask(
    shape: int,
    size: int,
    position: int,
    rotation: float,
    image_size: int = 32,
    *,
    scale: float = 0.5,
    offset: tuple[float, float] = (0.5, 0.5),
) -> np.ndarray:
    """The object's pixels, bool [S, S] (see `render`)."""
    if image_size < 16 or image_size % 2:
        raise ValueError(f"image_size must be even and >= 16, got {image_size}")
    if not (0 <= shape < len(SHAPES) and 0 <= size < len(SIZES) and 0 <= position < len(POSITIONS)):
        raise ValueError(f"label out of range: shape={shape}, size={size}, position={position}")
    quad = image_size // 2
    lo, hi = _SCALE_RANGE[size]
    s = (lo + (hi - lo) * float(scale)) * quad / 16
    theta = np.deg2rad(float(rotation))
    cos, sin = np.cos(theta), np.sin(theta)

    # The rotated object's extent around its centre (counter-clockwise on screen with y down: x' = x cos + y sin,
    # y' = -x sin + y cos), then the centre placed in the range that keeps that box inside the quadrant.
    if shape == 10:
        r = _CIRCLE_R * s
        x_min, x_max, y_min, y_max = -r, r, -r, r
    else:
        v = _hull(shape, s)
        vx, vy = v[:, 0] * cos + v[:, 1] * sin, -v[:, 0] * sin + v[:, 1] * cos
        x_min, x_max, y_min, y_max = vx.min(), vx.max(), vy.min(), vy.max()
    x0, y0 = (position % 2) * quad, (position // 2) * quad
    cx_lo, cx_hi = x0 + _MARGIN - x_min, x0 + quad - _MARGIN - x_max
    cy_lo, cy_hi = y0 + _MARGIN - y_min, y0 + quad - _MARGIN - y_max
    cx = cx_lo + (cx_hi - cx_lo) * float(offset[0])
    cy = cy_lo + (cy_hi - cy_lo) * float(offset[1])

    gx, gy = _grid(image_size)
    dx, dy = gx - cx, gy - cy
    if shape == 10:  # not rotated at all: a circle is exactly rotation invariant
        return dx * dx + dy * dy <= r * r
    u = dx * cos - dy * sin  # the inverse rotation: pixel offset -> object frame
    w = dx * sin + dy * cos
    if shape < 10:
        return _glyph_value(shape, u / s + (_GLYPH_W - 1) / 2, w / s + (_GLYPH_H - 1) / 2) >= _GLYPH_THRESHOLD
    if shape == 11:
        a = _SQUARE_A * s
        return (np.abs(u) <= a) & (np.abs(w) <= a)
    # The triangle: inside the three edges' half-planes (outward normals at 90, 210, 330 degrees, distance r / 2).
    r = _TRIANGLE_R * s
    inside = np.ones(u.shape, dtype=bool)
    for angle in np.deg2rad([90.0, 210.0, 330.0]):
        inside &= u * np.cos(angle) + w * np.sin(angle) <= r / 2
    return inside


def render(
    shape: int,
    colour: int,
    size: int,
    position: int,
    rotation: float,
    image_size: int = 32,
    *,
    scale: float = 0.5,
    offset: tuple[float, float] = (0.5, 0.5),
) -> np.ndarray:
    """The image, uint8 [S, S, 3]: `SHAPES[shape]` in exactly `COLOURS[colour]` on black, rotated `rotation` degrees
    counter-clockwise, entirely inside quadrant `POSITIONS[position]`. `scale` in [0, 1] places it within its size
    class's range (0 smallest); `offset` = (x, y) in [0, 1]^2 places its centre within the range that keeps it in
    the quadrant ((0.5, 0.5) centres it). Pure: the same arguments give the same pixels."""
    mask = render_mask(shape, size, position, rotation, image_size, scale=scale, offset=offset)
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[...] = np.asarray(BACKGROUND, dtype=np.uint8)
    image[mask] = np.asarray(list(COLOURS.values())[colour], dtype=np.uint8)
    return image


@dataclasses.dataclass(eq=False)
class CaptionedShapesConfig(SeededConfig):
    """`image_size` (even, >= 16; the font is legible from 32) and rotations uniform in [-max_rotation,
    max_rotation] degrees."""

    image_size: int = 32
    max_rotation: float = 30.0

    def __post_init__(self):
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"CaptionedShapesConfig.image_size must be even and >= 16, got {self.image_size}")
        if not 0 <= self.max_rotation <= 180:
            raise ValueError(f"CaptionedShapesConfig.max_rotation must be in [0, 180], got {self.max_rotation}")


class CaptionedShapes(SeededBuilder):
    """Digits and shapes with captions; see the module docstring."""

    BUILDER_CONFIGS = [CaptionedShapesConfig(name="default", num_train=10_000, num_test=1_000)]  # noqa: RUF012
    DESCRIPTION = (
        "Procedural 32x32 RGB images of one digit (0-9, 5x7 bitmap font) or shape (circle, square, triangle) in a "
        "flat palette colour on black, small or large, inside one quadrant, rotated; with a caption such as "
        "'a small red 7 in the top left' and class labels for shape, colour, size and position, and the rotation."
    )

    def _features(self) -> tfds.features.FeaturesDict:
        size = self.builder_config.image_size
        return tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "shape": tfds.features.ClassLabel(names=list(SHAPES)),
                "colour": tfds.features.ClassLabel(names=list(COLOURS)),
                "size": tfds.features.ClassLabel(names=list(SIZES)),
                "position": tfds.features.ClassLabel(names=list(POSITIONS)),
                "rotation": tfds.features.Tensor(shape=(), dtype=np.float32),
            }
        )

    def _example(self, rng: np.random.Generator, index: int) -> dict:
        del index
        cfg = self.builder_config
        shape = int(rng.integers(len(SHAPES)))
        colour = int(rng.integers(len(COLOURS)))
        size = int(rng.integers(len(SIZES)))
        position = int(rng.integers(len(POSITIONS)))
        rotation = np.float32(rng.uniform(-cfg.max_rotation, cfg.max_rotation))  # drawn at the stored value
        scale = float(rng.uniform())
        offset = (float(rng.uniform()), float(rng.uniform()))
        image = render(shape, colour, size, position, float(rotation), cfg.image_size, scale=scale, offset=offset)
        return {
            "image": image,
            "caption": caption(shape, colour, size, position),
            "shape": shape,
            "colour": colour,
            "size": size,
            "position": position,
            "rotation": rotation,
        }


__all__ = [
    "BACKGROUND",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "CaptionedShapes",
    "CaptionedShapesConfig",
    "caption",
    "parse_caption",
    "render",
    "render_mask",
]
