"""The `captioned_shapes` builder: it builds offline, is reproducible from its seed, and every caption agrees with its
labels and with the pixels of its image (colour, quadrant, size, a non-empty object)."""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from seqjax.data.builders import build
from seqjax.data.builders import captioned_shapes as cs

TINY = {"num_train": 64, "num_test": 16}
LABELS = ("shape", "colour", "size", "position")


def tiny(seed: int = 0) -> cs.CaptionedShapesConfig:
    return cs.CaptionedShapesConfig(name="tiny", seed=seed, **TINY)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("captioned_shapes")
    builder = build("captioned_shapes", str(data_dir), tiny())  # how long: benchmarks/input.py --parts builds
    source = builder.as_data_source()
    examples = {split: [source[split][i] for i in range(len(source[split]))] for split in ("train", "test")}
    return {"dir": data_dir, "builder": builder, "examples": examples}


def shards(data_dir: pathlib.Path) -> dict[str, bytes]:
    files = sorted(p for p in pathlib.Path(data_dir).glob("**/*.array_record*") if p.is_file())
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in files}


def quadrant_box(position: int, image_size: int = 32) -> tuple[int, int, int, int]:
    """(row_lo, row_hi, col_lo, col_hi), inclusive, of quadrant `position`."""
    half = image_size // 2
    row0, col0 = (position // 2) * half, (position % 2) * half
    return row0, row0 + half - 1, col0, col0 + half - 1


def assert_inside(mask: np.ndarray, position: int, what: str) -> None:
    rows, cols = np.nonzero(mask)
    assert rows.size > 0, f"{what}: empty object"
    r_lo, r_hi, c_lo, c_hi = quadrant_box(position, mask.shape[0])
    box = (rows.min(), rows.max(), cols.min(), cols.max())
    assert r_lo <= box[0] and box[1] <= r_hi and c_lo <= box[2] and box[3] <= c_hi, (
        f"{what}: bounding box {box} leaves quadrant {cs.POSITIONS[position]} {(r_lo, r_hi, c_lo, c_hi)}"
    )


# 1. It builds, offline, with the documented features.


def test_builds_with_documented_features(built):
    features = built["builder"].info.features
    assert set(features.keys()) == {"image", "caption", "rotation", *LABELS}
    assert features["image"].shape == (32, 32, 3) and features["image"].np_dtype == np.uint8
    assert features["rotation"].shape == () and features["rotation"].np_dtype == np.float32
    assert features["shape"].names == list(cs.SHAPES)
    assert features["colour"].names == list(cs.COLOURS)
    assert features["size"].names == list(cs.SIZES)
    assert features["position"].names == list(cs.POSITIONS)
    assert len(cs.SHAPES) == 13 and len(set(cs.COLOURS.values())) == len(cs.COLOURS) == 8

    for split, count in (("train", TINY["num_train"]), ("test", TINY["num_test"])):
        examples = built["examples"][split]
        assert len(examples) == count
        # the data source reads the files back without the builder
        source = tfds.data_source("captioned_shapes/tiny", data_dir=str(built["dir"]), download=False)
        assert len(source[split]) == count
        for ex in examples:
            assert set(ex) == {"image", "caption", "rotation", *LABELS}
            assert isinstance(ex["image"], np.ndarray)
            assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
            assert isinstance(ex["caption"], bytes)
            assert 0 <= ex["shape"] < 13 and 0 <= ex["colour"] < 8 and 0 <= ex["size"] < 2 and 0 <= ex["position"] < 4
            assert -30.0 <= float(ex["rotation"]) <= 30.0
            assert float(np.float32(ex["rotation"])) == float(ex["rotation"])  # stored as float32
    train = built["examples"]["train"]
    # the labels are drawn, not constant: several values of each in 64 examples
    for key in LABELS:
        assert len({ex[key] for ex in train}) >= 2, key
    assert len({ex["shape"] for ex in train}) >= 8
    assert np.std([float(ex["rotation"]) for ex in train]) > 5


def test_default_config_and_validation():
    (default,) = cs.CaptionedShapes.BUILDER_CONFIGS
    assert (default.name, default.num_train, default.num_test, default.image_size) == ("default", 10_000, 1_000, 32)
    with pytest.raises(ValueError):
        cs.CaptionedShapesConfig(name="odd", image_size=31)
    with pytest.raises(ValueError):
        cs.CaptionedShapesConfig(name="spin", max_rotation=200.0)


# 2. The seed decides the bytes.


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    again = build("captioned_shapes", str(tmp_path / "again"), tiny(seed=0))
    first, second = shards(built["dir"]), shards(tmp_path / "again")
    assert len(first) == 2 and first.keys() == second.keys()  # one train and one test shard
    assert first == second

    other = build("captioned_shapes", str(tmp_path / "other"), tiny(seed=1))
    third = shards(tmp_path / "other")
    assert third.keys() == first.keys()
    for name in first:
        assert third[name] != first[name], name
    seed0 = [bytes(ex["caption"]) for ex in again.as_data_source()["train"]]
    seed1 = [bytes(ex["caption"]) for ex in other.as_data_source()["train"]]
    assert sum(a != b for a, b in zip(seed0, seed1, strict=True)) > 32


# 3. Captions, labels and pixels agree.


def test_caption_round_trip_and_format():
    assert cs.caption(7, 0, 0, 0) == "a small red 7 in the top left"
    assert cs.caption(10, 2, 1, 3) == "a large blue circle in the bottom right"
    for shape, colour, size, position in itertools.product(range(13), range(8), range(2), range(4)):
        text = cs.caption(shape, colour, size, position)
        labels = {"shape": shape, "colour": colour, "size": size, "position": position}
        assert cs.parse_caption(text) == labels
        assert cs.parse_caption(text.encode()) == labels
    for bad in ("a small red 7 in the middle", "a tiny red 7 in the top left", "a small red 12 in the top left", ""):
        with pytest.raises(ValueError):
            cs.parse_caption(bad)


def test_every_caption_matches_its_labels_and_image(built):
    areas = {0: [], 1: []}
    for split, examples in built["examples"].items():
        for i, ex in enumerate(examples):
            labels = {key: ex[key] for key in LABELS}
            assert cs.parse_caption(ex["caption"]) == labels, (split, i)
            image = ex["image"]
            mask = np.any(image != np.asarray(cs.BACKGROUND, np.uint8), axis=-1)
            # every object pixel is exactly the caption's colour, and there is an object
            colour = np.asarray(list(cs.COLOURS.values())[ex["colour"]], np.uint8)
            assert np.all(image[mask] == colour), (split, i, ex["caption"])
            assert mask.sum() >= 10, (split, i, ex["caption"])
            # ... entirely inside the caption's quadrant
            assert_inside(mask, ex["position"], f"{split}[{i}] {ex['caption']!r}")
            areas[ex["size"]].append(int(mask.sum()))
    assert areas[0] and areas[1]
    assert np.mean(areas[1]) > 1.4 * np.mean(areas[0]), {k: np.mean(v) for k, v in areas.items()}


def test_render_stays_in_its_quadrant_everywhere():
    # Corners of the placement range, both ends of each size range, rotations well beyond the default +-30.
    rotations = (-180.0, -135.0, -90.0, -45.0, -30.0, 0.0, 17.0, 30.0, 45.0, 90.0, 180.0)
    offsets = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
    for shape, size, position in itertools.product(range(13), range(2), range(4)):
        for rotation, offset, scale in itertools.product(rotations, offsets, (0.0, 1.0)):
            mask = cs.render_mask(shape, size, position, rotation, scale=scale, offset=offset)
            assert_inside(mask, position, f"{cs.caption(shape, 0, size, position)} at {rotation} {offset} {scale}")
    for shape, position in itertools.product(range(13), range(4)):  # another image size
        assert_inside(cs.render_mask(shape, 1, position, 45.0, 64, scale=1.0, offset=(1.0, 0.0)), position, "64px")


def test_large_is_clearly_larger_than_small():
    for shape in range(13):
        small = [cs.render_mask(shape, 0, p, r, scale=s).sum() for p in range(4) for r in (-30, 0, 30) for s in (0, 1)]
        large = [cs.render_mask(shape, 1, p, r, scale=s).sum() for p in range(4) for r in (-30, 0, 30) for s in (0, 1)]
        assert np.mean(large) > 1.5 * np.mean(small), (cs.SHAPES[shape], np.mean(small), np.mean(large))
        # at equal placement and rotation, the smallest large object beats the largest small one
        for p in range(4):
            assert cs.render_mask(shape, 1, p, 0.0, scale=0.0).sum() > cs.render_mask(shape, 0, p, 0.0, scale=1.0).sum()


def test_render_colours_exactly():
    for colour, rgb in enumerate(cs.COLOURS.values()):
        image = cs.render(3, colour, 1, 2, 10.0)
        mask = cs.render_mask(3, 1, 2, 10.0)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        assert np.all(image[mask] == rgb) and np.all(image[~mask] == cs.BACKGROUND)


# 4. The glyphs and the rotation.


def test_digits_render_differently():
    for size in (0, 1):
        masks = {cs.render_mask(d, size, 0, 0.0).tobytes() for d in range(10)}
        assert len(masks) == 10, size
    shapes = {cs.render_mask(s, 1, 1, 20.0).tobytes() for s in range(13)}
    assert len(shapes) == 13


def test_rotation():
    for digit in (2, 4, 7):  # no rotational symmetry
        upright = cs.render_mask(digit, 1, 0, 0.0)
        for angle in (10.0, -20.0, 90.0):
            assert (cs.render_mask(digit, 1, 0, angle) != upright).sum() >= 5, (digit, angle)
    # counter-clockwise: a 1 tilted by +30 degrees has its top to the left of its bottom, by -30 to the right
    for angle, sign in ((30.0, -1), (-30.0, 1)):
        rows, cols = np.nonzero(cs.render_mask(1, 1, 0, angle))
        middle = np.median(rows)
        lean = cols[rows < middle].mean() - cols[rows > middle].mean()
        assert sign * lean > 1.0, (angle, lean)
    # a circle does not change; a square turned by 90 degrees hardly does, by 45 it does
    circle = cs.render_mask(10, 1, 3, 0.0)
    for angle in (13.0, 30.0, 45.0, -77.0, 180.0):
        assert np.array_equal(cs.render_mask(10, 1, 3, angle), circle)
    square = cs.render_mask(11, 1, 3, 0.0)
    assert (cs.render_mask(11, 1, 3, 90.0) != square).sum() <= 2
    assert (cs.render_mask(11, 1, 3, 45.0) != square).sum() >= 10


# 5. Any example can be regenerated without the files.


def content(ex: dict) -> tuple:
    """An example as hashable values (the caption as bytes, as it is read back)."""
    text = ex["caption"] if isinstance(ex["caption"], bytes) else ex["caption"].encode()
    image = np.asarray(ex["image"])
    return (text, image.dtype.str, image.shape, image.tobytes(), float(ex["rotation"]), *(int(ex[k]) for k in LABELS))


def test_example_regenerates_the_stored_example(built):
    # TFDS stores a split in a shuffled order, so `example(split, i)` for i in range(count) must be the stored
    # examples one for one: the same multiset of full contents.
    builder = built["builder"]
    for split, stored in built["examples"].items():
        fresh = [builder.example(split, i) for i in range(len(stored))]
        assert sorted(map(content, fresh)) == sorted(map(content, stored)), split
        assert all(np.asarray(ex["image"]).dtype == np.uint8 for ex in fresh)
        assert len(set(map(content, fresh))) == len(fresh)  # different indices: different examples
    assert builder.example("train", 5)["image"].tobytes() == builder.example("train", 5)["image"].tobytes()
    assert content(builder.example("train", 3)) != content(builder.example("test", 3))
