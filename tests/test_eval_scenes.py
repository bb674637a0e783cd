"""The scene check of generated synthetic scenes (fdm_eval.scene_scores) against scenes with known masks."""
import numpy as np

from fdm_core.scenes import ellipse_area_range, make_scenes
from fdm_eval.scene_scores import AREA, find_object, generation_scores, is_valid_scene


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_the_scorer_takes_every_ellipse_the_scenes_can_draw():
    smallest, largest = ellipse_area_range()
    assert AREA[0] < smallest and largest < AREA[1]


def test_true_scenes_are_valid_and_their_object_is_found():
    images, labels = make_scenes("ellipse", 200, 16, seed=3)
    assert np.mean([is_valid_scene(x) for x in images]) >= 0.95
    assert np.mean([_iou(find_object(x)[0], lab == 1) for x, lab in zip(images, labels)]) >= 0.95


def _gradient(size=16):
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    return np.stack([60 + 120 * xx, 50 + 100 * yy, 200 - 80 * xx]).astype(np.float64)


def _disc(size, cy, cx, r):
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_what_is_not_a_scene():
    size = 16
    rng = np.random.default_rng(0)
    assert not any(is_valid_scene((rng.random((3, size, size)) * 255).astype(np.uint8)) for _ in range(20))
    plain = _gradient(size)
    assert not is_valid_scene(plain.astype(np.uint8))  # nothing in it
    one = plain.copy()
    one[:, _disc(size, 8, 7, 4)] = [[250], [20], [20]]
    assert is_valid_scene(one.astype(np.uint8))
    obj, measures = find_object(one.astype(np.uint8))
    assert (obj == _disc(size, 8, 7, 4)).all() and measures["background_rms"] < 0.01
    two = plain.copy()
    two[:, _disc(size, 4, 4, 2.5) | _disc(size, 11, 11, 2.5)] = [[250], [20], [20]]
    assert not is_valid_scene(two.astype(np.uint8))  # two objects
    plus = plain.copy()
    plus[:, 7:9, 2:14] = plus[:, 2:14, 7:9] = np.array([250, 20, 20])[:, None, None]
    assert find_object(plus.astype(np.uint8))[1]["ellipse_fit"] < 0.75
    assert not is_valid_scene(plus.astype(np.uint8))  # not compact: a cross


def test_generation_scores_by_hand():
    size = 16
    image = _gradient(size)
    disc = _disc(size, 8, 7, 4)
    image[:, disc] = [[250], [20], [20]]
    images = np.stack([image, image]).astype(np.uint8)
    generated = np.stack([disc, disc]).astype(np.uint8) * 1  # object in channel 1
    generated[1, :, :3] = 1  # the second sample's mask adds a band of 48 pixels to the object
    readout = generated.copy()
    readout[0] = 1 - readout[0]  # the read-out swaps the channels of the first sample
    scores = generation_scores(images, generated, readout)
    assert scores["valid"] == 1.0
    area = disc.sum()
    band_extra = (~disc[:, :3]).sum()
    assert scores["mask_content_iou"] == np.mean([1.0, area / (area + band_extra)])
    assert scores["resegment_miou"] == np.mean([0.0, 1.0])
