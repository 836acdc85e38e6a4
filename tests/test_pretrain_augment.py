"""The multi-crop pipeline: its random statistics over many seeded draws, and each pixel
operation against Pillow (the library the reference transforms run on) or a direct formula."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from dino_vos.pretrain import augment
from dino_vos.pretrain.augment import MultiCropAugmentation
from dino_vos.synthetic import make_clip

DRAWS = 300  # images; 2 global + 4 local crops each


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A real-looking (textured, coloured) 96 x 128 RGB frame."""
    return make_clip(1, (96, 128), seed=4).frames[0]


@pytest.fixture(scope="module")
def crop224(picture) -> np.ndarray:
    return np.array(Image.fromarray(picture).resize((224, 224), Image.Resampling.BICUBIC))


def _within(count: int, total: int, p: float) -> bool:
    """``count / total`` is within 4.5 binomial standard deviations of ``p``."""
    return abs(count / total - p) <= 4.5 * math.sqrt(p * (1 - p) / total) + 1e-9


@pytest.fixture(scope="module")
def draws(picture) -> dict:
    """Run the pipeline DRAWS times (seeds 0..DRAWS-1) recording every random decision."""
    seen: dict = defaultdict(list)
    crop_index = {"value": 0}
    originals = {
        name: getattr(augment, name)
        for name in (
            "resized_crop",
            "color_jitter",
            "to_grayscale",
            "gaussian_blur",
            "solarize",
            "adjust_brightness",
            "adjust_contrast",
            "adjust_saturation",
            "adjust_hue",
        )
    }

    def recorder(name):
        def record(image, *args):
            crop = crop_index["value"]
            if name == "resized_crop":
                crop_index["value"] = crop = (crop + 1) % 6
                top, left, height, width = args[0]
                seen["area"].append((crop, height * width / (96 * 128), width / height))
                seen["order"].append([])
            elif name.startswith("adjust_"):
                seen[name].append(args[0])
                seen["order"][-1].append(name)
            else:
                seen[name].append(crop)
                if name == "gaussian_blur":
                    seen["sigma"].append(args[0])
            return originals[name](image, *args)

        return record

    aug = MultiCropAugmentation(32, 16, local_number=4)
    flips = []
    original_flip = cv2.flip
    mp = pytest.MonkeyPatch()
    try:
        for name in originals:
            mp.setattr(augment, name, recorder(name))
        mp.setattr(augment.cv2, "flip", lambda a, c: flips.append(1) or original_flip(a, c))
        for seed in range(DRAWS):
            torch.manual_seed(seed)
            aug(picture)
    finally:
        mp.undo()
    seen["flips"] = flips
    return seen


def test_crop_scales_and_aspect_ratios(draws):
    """Area fraction in (0.4, 1) for global crops and (0.05, 0.4) for local crops, spread over
    the range; aspect ratio in (3/4, 4/3)."""
    areas = draws["area"]
    assert len(areas) == DRAWS * 6
    first = 1  # crop index 1 and 2 are the global crops (the counter starts each image at 1)
    global_areas = [a for c, a, _ in areas if c in (first, first + 1)]
    local_areas = [a for c, a, _ in areas if c not in (first, first + 1)]
    assert len(global_areas) == 2 * DRAWS and len(local_areas) == 4 * DRAWS
    # Integer crop sides round the area a little; the range is (almost) filled.
    assert 0.39 <= min(global_areas) < 0.45 and 0.93 < max(global_areas) <= 1.0
    assert 0.045 <= min(local_areas) < 0.07 and 0.36 < max(local_areas) <= 0.41
    ratios = [r for _, _, r in areas]
    assert 0.72 <= min(ratios) < 0.8 and 1.25 < max(ratios) <= 1.39


def test_operation_probabilities(draws):
    crops = DRAWS * 6
    global1, global2 = 1, 2
    blurred = Counter(draws["gaussian_blur"])
    assert blurred[global1] == DRAWS  # p 1.0
    assert _within(blurred[global2], DRAWS, 0.1)
    local_blurs = sum(n for c, n in blurred.items() if c not in (global1, global2))
    assert _within(local_blurs, 4 * DRAWS, 0.5)
    solarized = Counter(draws["solarize"])
    assert set(solarized) == {global2} and _within(solarized[global2], DRAWS, 0.2)
    assert _within(len(draws["color_jitter"]), crops, 0.8)
    assert _within(len(draws["to_grayscale"]), crops, 0.2)
    assert _within(len(draws["flips"]), crops, 0.5)


def test_jitter_factors_order_and_blur_sigma(draws):
    ranges = {
        "adjust_brightness": (0.6, 1.4),
        "adjust_contrast": (0.6, 1.4),
        "adjust_saturation": (0.8, 1.2),
        "adjust_hue": (-0.1, 0.1),
    }
    jitters = len(draws["color_jitter"])
    for name, (low, high) in ranges.items():
        values = np.array(draws[name])
        assert len(values) == jitters  # every jitter applies all four, each once
        assert low <= values.min() < low + 0.02 and high - 0.02 < values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.05 * (high - low)
    firsts = Counter(order[0] for order in draws["order"] if order)
    assert set(firsts) == set(ranges) and all(_within(n, jitters, 0.25) for n in firsts.values())
    sigma = np.array(draws["sigma"])
    assert 0.1 <= sigma.min() < 0.15 and 1.95 < sigma.max() <= 2.0
    assert abs(sigma.mean() - 1.05) < 0.06


def test_same_seed_same_crops(picture):
    aug = MultiCropAugmentation(32, 16, local_number=2)
    torch.manual_seed(7)
    first = aug(picture)
    torch.manual_seed(7)
    again = aug(Image.fromarray(picture))  # a PIL image is accepted too
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


# -- pixel operations -----------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [0.63, 1.37])
def test_brightness_contrast_solarize_equal_pillow(crop224, factor):
    pil = Image.fromarray(crop224)
    expected = np.asarray(ImageEnhance.Brightness(pil).enhance(factor))
    assert np.array_equal(augment.adjust_brightness(crop224, factor), expected)
    expected = np.asarray(ImageEnhance.Contrast(pil).enhance(factor))
    assert np.abs(augment.adjust_contrast(crop224, factor).astype(int) - expected).max() <= 1
    assert np.array_equal(augment.solarize(crop224), np.asarray(ImageOps.solarize(pil, 128)))


@pytest.mark.parametrize("factor", [0.81, 1.19])
def test_saturation_and_grayscale_within_one_level_of_pillow(crop224, factor):
    pil = Image.fromarray(crop224)
    expected = np.asarray(ImageEnhance.Color(pil).enhance(factor)).astype(int)
    assert np.abs(augment.adjust_saturation(crop224, factor) - expected).max() <= 1
    gray = np.asarray(pil.convert("L")).astype(int)
    ours = augment.to_grayscale(crop224)
    assert ours.shape == crop224.shape and np.abs(ours - gray[..., None]).max() <= 1


@pytest.mark.parametrize("shift", [-0.09, 0.04])
def test_hue_shift_rotates_hue_and_keeps_value(crop224, shift):
    """Hue moves by ``int(shift * 255)`` of 256 steps; brightness (HSV value) stays."""
    ours = augment.adjust_hue(crop224, shift)
    pil = Image.fromarray(crop224)
    h, s, v = (np.asarray(c).astype(int) for c in pil.convert("HSV").split())
    h2, _, v2 = (np.asarray(c).astype(int) for c in Image.fromarray(ours).convert("HSV").split())
    colourful = (s > 60) & (v > 60)
    moved = (h2 - h) % 256
    expected = int(shift * 255) % 256
    steps = np.minimum((moved - expected) % 256, (expected - moved) % 256)[colourful]
    assert colourful.mean() > 0.1 and np.median(steps) <= 1 and np.mean(steps <= 3) > 0.95
    assert np.abs(v2 - v).max() <= 2


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_blur_is_the_exact_gaussian(crop224, sigma):
    """Against a direct float convolution with the sampled Gaussian over +-3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(
        crop224.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), "edge"
    )
    rows = sum(w * padded[i : i + 224] for i, w in enumerate(kernel))
    expected = sum(w * rows[:, i : i + 224] for i, w in enumerate(kernel))
    ours = augment.gaussian_blur(crop224, sigma).astype(np.float64)
    assert np.abs(ours - expected).max() <= 1.0


def test_resized_crop_within_one_level_of_pillow(picture):
    chw = torch.from_numpy(picture).permute(2, 0, 1)
    box = (10, 20, 70, 90)  # top, left, height, width
    ours = augment.resized_crop(chw, box, 40)
    pil = (
        Image.fromarray(picture).crop((20, 10, 110, 80)).resize((40, 40), Image.Resampling.BICUBIC)
    )
    assert ours.shape == (40, 40, 3) and ours.flags.c_contiguous
    assert np.abs(ours.astype(int) - np.asarray(pil)).max() <= 1


def test_normalisation(crop224):
    ours = augment._Normalizer()(crop224)
    mean = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(crop224).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
