"""tools/classify.py's --channel_swap, end to end in a subprocess.

A red-only PNG goes through a tiny 3-channel net whose 1x1 convolution weighs each
input channel differently, so where the red plane lands (net channel 0 or 2) changes
the scores.  Each run is compared with preprocessing and a forward pass written here
in NumPy: centre crop (pycaffe's box), channel order, x255, then conv 1x1 -> global
average pool -> inner product -> softmax.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import framework

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFY = os.path.join(ROOT, "tools", "classify.py")

CROP = 4
IMAGE = (7, 6)  # H, W of the PNG and of --images_dim, so nothing is resized before cropping
CLASSES = 5
MIX = 4
NET = f"""
name: "swap"
layer {{ name: "data" type: "Input" top: "data"
        input_param {{ shape {{ dim: 1 dim: 3 dim: {CROP} dim: {CROP} }} }} }}
layer {{ name: "mix" type: "Convolution" bottom: "data" top: "mix"
        convolution_param {{ num_output: {MIX} kernel_size: 1 }} }}
layer {{ name: "pool" type: "Pooling" bottom: "mix" top: "pool"
        pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param {{ num_output: {CLASSES} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""


@pytest.fixture
def model(tmp_path):
    """(prototxt, caffemodel, weights dict) of the net with chosen weights."""
    rng = np.random.default_rng(31)
    # per input channel a different scale, so the three channels are told apart
    mix_w = rng.normal(0, 1, (MIX, 3)) * np.array([0.004, -0.009, 0.013])
    params = {"mix_w": mix_w.astype(np.float32),
              "mix_b": rng.normal(0, 0.1, MIX).astype(np.float32),
              "fc_w": rng.normal(0, 0.8, (CLASSES, MIX)).astype(np.float32),
              "fc_b": rng.normal(0, 0.1, CLASSES).astype(np.float32)}
    prototxt = tmp_path / "swap.prototxt"
    prototxt.write_text(NET)
    net = framework.Net(str(prototxt), framework.TEST)
    net.params["mix"][0].data[...] = params["mix_w"].reshape(MIX, 3, 1, 1)
    net.params["mix"][1].data[...] = params["mix_b"]
    net.params["fc"][0].data[...] = params["fc_w"]
    net.params["fc"][1].data[...] = params["fc_b"]
    weights = tmp_path / "swap.caffemodel"
    net.save(str(weights))
    return str(prototxt), str(weights), params


@pytest.fixture
def red_png(tmp_path):
    rng = np.random.default_rng(32)
    pixels = np.zeros(IMAGE + (3,), np.uint8)
    pixels[..., 0] = rng.integers(30, 256, IMAGE)  # red only; green and blue stay 0
    path = tmp_path / "red.png"
    Image.fromarray(pixels).save(path)
    return str(path), pixels


def expected_scores(pixels, params, order):
    """Hand preprocessing + forward for one image; ``order`` lists the image channels fed to
    net channels 0, 1, 2."""
    image = pixels.astype(np.float64) / 255.0
    height, width = IMAGE
    # pycaffe Classifier: centre box = image_dims / 2 -+ crop / 2, truncated to int
    y0, x0 = int(height / 2.0 - CROP / 2.0), int(width / 2.0 - CROP / 2.0)
    crop = image[y0:y0 + CROP, x0:x0 + CROP]
    x = crop[:, :, list(order)].transpose(2, 0, 1) * 255.0          # 3 x CROP x CROP
    mix = np.einsum("oc,chw->ohw", params["mix_w"].astype(np.float64), x)
    mix += params["mix_b"].astype(np.float64)[:, None, None]
    pooled = mix.mean(axis=(1, 2))
    fc = params["fc_w"].astype(np.float64) @ pooled + params["fc_b"]
    e = np.exp(fc - fc.max())
    return e / e.sum()


def classify(model, image, out, *swap_args):
    prototxt, weights, _ = model
    result = subprocess.run(
        [sys.executable, CLASSIFY, image, str(out), "--model_def", prototxt,
         "--pretrained_model", weights, "--center_only", "--images_dim",
         f"{IMAGE[0]},{IMAGE[1]}", *swap_args],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    scores = np.load(out)
    assert scores.shape == (1, CLASSES)
    return scores[0]


def test_channel_swap_changes_the_scores_as_computed_by_hand(model, red_png, tmp_path):
    image, pixels = red_png
    params = model[2]
    bgr = classify(model, image, tmp_path / "bgr.npy", "--channel_swap", "2,1,0")
    rgb = classify(model, image, tmp_path / "rgb.npy", "--channel_swap", "")

    np.testing.assert_allclose(bgr, expected_scores(pixels, params, (2, 1, 0)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rgb, expected_scores(pixels, params, (0, 1, 2)),
                               rtol=1e-5, atol=1e-7)
    # the red plane feeds net channel 2 in one run and channel 0 in the other
    assert np.abs(bgr - rgb).max() > 0.05
    # and the references themselves are distinct, so matching both means something
    assert not np.allclose(expected_scores(pixels, params, (2, 1, 0)),
                           expected_scores(pixels, params, (0, 1, 2)), atol=0.05)


def test_identity_swap_and_the_default(model, red_png, tmp_path):
    image, pixels = red_png
    params = model[2]
    identity = classify(model, image, tmp_path / "id.npy", "--channel_swap", "0,1,2")
    np.testing.assert_allclose(identity, expected_scores(pixels, params, (0, 1, 2)),
                               rtol=1e-5, atol=1e-7)
    # without the flag a 3-channel net gets 2,1,0 (RGB image to BGR net), as Caffe's classify.py
    default = classify(model, image, tmp_path / "default.npy")
    np.testing.assert_allclose(default, expected_scores(pixels, params, (2, 1, 0)),
                               rtol=1e-5, atol=1e-7)
