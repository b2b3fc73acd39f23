"""framework.io's image helpers and Transformer, framework.Classifier and tools/classify.py.

References are written here independently: plain loops for resizing and preprocessing,
explicit crop positions, and a direct ``net.forward`` on hand-preprocessed crops.
"""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import framework
from framework.errors import CaffeError
from framework.io import (Transformer, TransformerError, load_image, oversample, resize_image,
                          save_mean_file)
from model_utils import randomize_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFY = os.path.join(ROOT, "tools", "classify.py")

TINY_NET = """\
name: "tiny"
input: "data"
input_dim: 2
input_dim: 3
input_dim: 8
input_dim: 8
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
        inner_product_param { num_output: %d } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
CLASSES = 7
CROP = (8, 8)
IMAGE_DIMS = (11, 12)  # images are written at this size, so no resize happens before cropping


def _load_classify():
    spec = importlib.util.spec_from_file_location("classify_tool", CLASSIFY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


classify_tool = _load_classify()


@pytest.fixture
def tiny(tmp_path):
    """(prototxt path, caffemodel path) of a random 7-class conv net on 3x8x8 inputs, batch 2."""
    model = tmp_path / "tiny.prototxt"
    model.write_text(TINY_NET % CLASSES)
    net = framework.Net(str(model), framework.TEST)
    randomize_params(net, seed=3)
    weights = tmp_path / "tiny.caffemodel"
    net.save(str(weights))
    return str(model), str(weights)


def write_images(folder, count, size=IMAGE_DIMS, ext="png", seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        path = os.path.join(folder, f"img{i}.{ext}")
        Image.fromarray(pixels).save(path, quality=90) if ext == "jpg" else \
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def pillow_rgb(path):
    """Reference decode: Pillow RGB / 255 as float32."""
    with Image.open(path) as img:
        return (np.asarray(img.convert("RGB"), dtype=np.float32) / np.float32(255))


def reference_crops(image, crop, ten):
    """The centre crop, or the 4 corners + centre and their mirrors (pycaffe's order)."""
    H, W = image.shape[:2]
    ch, cw = crop
    cy, cx = (H - ch) // 2, (W - cw) // 2
    corners = [(0, 0), (0, W - cw), (H - ch, 0), (H - ch, W - cw), (cy, cx)] if ten else [(cy, cx)]
    crops = [image[y:y + ch, x:x + cw] for y, x in corners]
    if ten:
        crops += [c[:, ::-1] for c in crops]
    return crops


def reference_scores(model, weights, images, ten=True, raw_scale=255.0, mean=None,
                     input_scale=None, swap=(2, 1, 0)):
    """Direct net.forward on hand-preprocessed crops, averaged per image."""
    batch = []
    for image in images:
        for crop in reference_crops(image, CROP, ten):
            x = crop[:, :, list(swap)] * np.float32(raw_scale)
            if mean is not None:
                x = x - np.asarray(mean, dtype=np.float32)
            if input_scale is not None:
                x = x * np.float32(input_scale)
            batch.append(x.transpose(2, 0, 1))
    net = framework.Net(model, weights, framework.TEST)
    scores = np.array(net.forward(data=np.stack(batch))["prob"])
    return scores.reshape(len(images), 10, -1).mean(1) if ten else scores


# ----------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------

def test_transformer_matches_hand_computation():
    rng = np.random.default_rng(0)
    image = rng.random((4, 5, 3), dtype=np.float32)
    original = image.copy()
    t = Transformer({"data": (2, 3, 4, 5)})
    swap, mean, raw, scale = (1, 2, 0), np.array([10.0, 20.0, 30.0]), 255.0, 0.5
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", swap)
    t.set_raw_scale("data", raw)
    t.set_mean("data", mean)
    t.set_input_scale("data", scale)
    out = t.preprocess("data", image)
    expected = np.empty((3, 4, 5))
    for c in range(3):
        for h in range(4):
            for w in range(5):
                expected[c, h, w] = (image[h, w, swap[c]] * raw - mean[c]) * scale
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(image, original)  # the caller's array is left alone
    back = t.deprocess("data", out[None])
    np.testing.assert_allclose(back, image, rtol=1e-5, atol=1e-6)


def test_transformer_elementwise_mean_and_no_settings():
    rng = np.random.default_rng(1)
    image = rng.random((3, 4, 2)).astype(np.float32)
    t = Transformer({"x": (1, 2, 3, 4)})
    np.testing.assert_array_equal(t.preprocess("x", image), image)  # nothing set: unchanged
    t.set_transpose("x", (2, 0, 1))
    mean = rng.random((2, 3, 4))
    t.set_mean("x", mean)
    np.testing.assert_allclose(t.preprocess("x", image), image.transpose(2, 0, 1) - mean,
                               rtol=1e-6)
    gray = Transformer({"g": (1, 1, 3, 4)})
    gray.set_transpose("g", (2, 0, 1))
    gray.set_mean("g", np.full((3, 4), 0.25))  # (H, W) mean of a 1-channel input
    np.testing.assert_allclose(gray.preprocess("g", image[:, :, :1]),
                               image[:, :, :1].transpose(2, 0, 1) - 0.25, rtol=1e-6)


def test_transformer_resizes_to_the_input_size():
    rng = np.random.default_rng(2)
    image = rng.random((8, 10, 3)).astype(np.float32)
    t = Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    np.testing.assert_array_equal(t.preprocess("data", image),
                                  resize_image(image, (4, 5)).transpose(2, 0, 1))


@pytest.mark.parametrize("call,match", [
    (lambda t: t.preprocess("nope", np.zeros((4, 5, 3))), "not one of the net inputs"),
    (lambda t: t.set_transpose("data", (1, 0)), "needs 3 axes"),
    (lambda t: t.set_transpose("data", (0, 0, 1)), "not a permutation"),
    (lambda t: t.set_channel_swap("data", (1, 0)), "needs 3 entries"),
    (lambda t: t.set_mean("data", np.zeros(4)), "mean has 4 channels"),
    (lambda t: t.set_mean("data", np.zeros((3, 5, 5))), "incompatible with input"),
    (lambda t: t.set_mean("data", np.zeros((1, 3, 4, 5))), "invalid"),
])
def test_transformer_errors(call, match):
    t = Transformer({"data": (2, 3, 4, 5)})
    with pytest.raises(TransformerError, match=match):
        call(t)
    with pytest.raises(ValueError):  # pycaffe raised ValueError for these
        call(Transformer({"data": (2, 3, 4, 5)}))


# ----------------------------------------------------------------------------------
# resize_image, load_image, oversample
# ----------------------------------------------------------------------------------

def slow_bilinear(image, h, w):
    H, W, K = image.shape
    out = np.empty((h, w, K))
    for i in range(h):
        y = min(max((i + 0.5) * H / h - 0.5, 0), H - 1)
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, H - 1)
        for j in range(w):
            x = min(max((j + 0.5) * W / w - 0.5, 0), W - 1)
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, W - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                         + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
    return out


@pytest.mark.parametrize("shape,new", [((3, 4, 3), (7, 9)), ((9, 7, 2), (4, 3)),
                                       ((5, 5, 1), (5, 8)), ((1, 6, 3), (3, 2))])
def test_resize_image_bilinear(shape, new):
    rng = np.random.default_rng(4)
    image = rng.random(shape).astype(np.float32)
    out = resize_image(image, new)
    assert out.dtype == np.float32 and out.shape == new + (shape[2],)
    np.testing.assert_allclose(out, slow_bilinear(image.astype(np.float64), *new), rtol=1e-5,
                               atol=1e-6)


def test_resize_image_nearest_constant_and_identity():
    image = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    near = resize_image(image, (6, 3), interp_order=0)
    # the source pixel containing each output pixel's centre: rows 0 0 1 1 2 2, columns 0 2 3
    expected = np.array([[image[i // 2, (0, 2, 3)[j], 0] for j in range(3)] for i in range(6)])
    np.testing.assert_array_equal(near[:, :, 0], expected)
    const = resize_image(np.full((3, 3, 3), 0.7, dtype=np.float32), (5, 4))
    assert np.all(const == np.float32(0.7))
    same = resize_image(image, (3, 4))
    np.testing.assert_array_equal(same, image)
    assert same is not image
    with pytest.raises(TransformerError, match="interp_order"):
        resize_image(image, (5, 5), interp_order=3)


def test_load_image_color_gray_alpha_and_16bit(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = load_image(tmp_path / "rgb.png")
    assert img.dtype == np.float32 and img.shape == (5, 6, 3)
    np.testing.assert_allclose(img, rgb / 255.0, rtol=1e-6)  # RGB order, [0, 1]
    lum = load_image(tmp_path / "rgb.png", color=False)
    expected = (rgb / 255.0) @ np.array([0.2125, 0.7154, 0.0721])
    assert lum.shape == (5, 6, 1)
    np.testing.assert_allclose(lum[:, :, 0], expected, rtol=1e-5)

    gray = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    g3 = load_image(tmp_path / "gray.png")
    assert g3.shape == (4, 3, 3)
    for c in range(3):
        np.testing.assert_allclose(g3[:, :, c], gray / 255.0, rtol=1e-6)
    assert load_image(tmp_path / "gray.png", color=False).shape == (4, 3, 1)

    rgba = rng.integers(0, 256, (3, 3, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png"), rgba[:, :, :3] / 255.0,
                               rtol=1e-6)

    deep = rng.integers(0, 65536, (3, 4), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(load_image(tmp_path / "deep.png", color=False)[:, :, 0],
                               deep / 65535.0, rtol=1e-6)

    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=85)
    np.testing.assert_allclose(load_image(tmp_path / "rgb.jpg"), pillow_rgb(tmp_path / "rgb.jpg"))


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(CaffeError, match=r"image file '.*missing\.png' not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_text("not an image")
    with pytest.raises(CaffeError, match=r"cannot read image file '.*junk\.jpg'"):
        load_image(tmp_path / "junk.jpg")


def test_oversample_crop_positions_and_mirrors():
    H, W = 7, 9
    ys, xs = np.mgrid[0:H, 0:W]
    first = np.stack([ys, xs, np.zeros_like(ys)], axis=2).astype(np.float32)
    second = first + np.float32(100)
    crops = oversample([first, second], (4, 5))
    assert crops.shape == (20, 4, 5, 3) and crops.dtype == np.float32
    # top-left corners: (0,0), (0,W-5), (H-4,0), (H-4,W-5), centre (trunc(3.5-2), trunc(4.5-2.5))
    starts = [(0, 0), (0, 4), (3, 0), (3, 4), (1, 2)]
    for image, base in ((first, 0), (second, 10)):
        for j, (y, x) in enumerate(starts):
            np.testing.assert_array_equal(crops[base + j], image[y:y + 4, x:x + 5])
            np.testing.assert_array_equal(crops[base + 5 + j], image[y:y + 4, x:x + 5][:, ::-1])
    with pytest.raises(TransformerError, match="larger than the image"):
        oversample([first], (8, 5))


# ----------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------

def make_classifier(tiny, **kwargs):
    model, weights = tiny
    options = dict(image_dims=IMAGE_DIMS, mean=np.array([104.0, 117.0, 123.0], np.float32),
                   raw_scale=255.0, input_scale=0.01, channel_swap=(2, 1, 0))
    options.update(kwargs)
    return framework.Classifier(model, weights, **options)


def test_classifier_ten_crop_and_centre_match_direct_forward(tiny, tmp_path):
    paths = write_images(tmp_path, 3)
    images = [load_image(p) for p in paths]
    clf = make_classifier(tiny)
    assert isinstance(clf, framework.Net) and clf.phase == framework.TEST
    mean = np.array([104.0, 117.0, 123.0], np.float32)
    ten = clf.predict(images)  # 30 crops through a batch-2 net: 15 chunks
    assert ten.shape == (3, CLASSES)
    np.testing.assert_allclose(ten, reference_scores(*tiny, images, True, mean=mean,
                                                     input_scale=0.01), rtol=1e-5, atol=1e-7)
    centre = clf.predict(images, oversample=False)
    np.testing.assert_allclose(centre, reference_scores(*tiny, images, False, mean=mean,
                                                        input_scale=0.01), rtol=1e-5, atol=1e-7)
    assert not np.allclose(ten, centre, rtol=1e-3)
    np.testing.assert_allclose(ten.sum(1), 1, rtol=1e-5)


def test_classifier_resizes_to_image_dims(tiny, tmp_path):
    paths = write_images(tmp_path, 2, size=(20, 15))
    images = [load_image(p) for p in paths]
    clf = make_classifier(tiny)
    resized = [resize_image(im, IMAGE_DIMS) for im in images]
    mean = np.array([104.0, 117.0, 123.0], np.float32)
    np.testing.assert_allclose(clf.predict(images),
                               reference_scores(*tiny, resized, True, mean=mean, input_scale=0.01),
                               rtol=1e-5, atol=1e-7)


def test_classifier_default_image_dims_is_the_crop(tiny, tmp_path):
    images = [load_image(p) for p in write_images(tmp_path, 1, size=CROP)]
    clf = make_classifier(tiny, image_dims=None, mean=None, input_scale=0.01)
    assert clf.image_dims == CROP
    # all five crops are the whole image: the average of it and its mirror
    both = reference_scores(*tiny, [images[0], images[0][:, ::-1]], False, input_scale=0.01)
    np.testing.assert_allclose(clf.predict(images)[0], both.mean(0), rtol=1e-5, atol=1e-7)


def test_classifier_errors(tiny):
    with pytest.raises(CaffeError, match="smaller than the net's input 8x8"):
        make_classifier(tiny, image_dims=(6, 10))
    with pytest.raises(TransformerError, match="mean has 4 channels"):
        make_classifier(tiny, mean=np.zeros(4))
    clf = make_classifier(tiny)
    with pytest.raises(CaffeError, match="image 1 has shape"):
        clf.predict([np.zeros((11, 12, 3)), np.zeros((11, 12, 1))])


# ----------------------------------------------------------------------------------
# tools/classify.py
# ----------------------------------------------------------------------------------

LINE = re.compile(r'^  (\d+\.\d{5})(?: - "(.*)")? \(class (\d+)\)$')


def run(argv, capsys):
    code = classify_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def printed_top5(out):
    """{image name: [(score, label, class)]} from classify.py's output."""
    results, current = {}, None
    for line in out.splitlines():
        match = LINE.match(line)
        if match:
            results[current].append((float(match.group(1)), match.group(2), int(match.group(3))))
        elif line.endswith(":") and not line.startswith(" "):
            current = line[:-1]
            results[current] = []
    return results


def check_top5(printed, scores, labels=None):
    assert len(printed) == 5
    order = np.argsort(-scores, kind="stable")[:5]
    assert [c for _, _, c in printed] == list(order)
    for (value, label, c) in printed:
        assert value == pytest.approx(float(scores[c]), abs=6e-6)
        assert label == (labels[c] if labels else None)


def tiny_args(tiny, *extra):
    model, weights = tiny
    return ["--model_def", model, "--pretrained_model", weights,
            "--images_dim", f"{IMAGE_DIMS[0]},{IMAGE_DIMS[1]}", "--input_scale", "0.01", *extra]


def test_classify_single_image(tiny, tmp_path, capsys):
    (path,) = write_images(tmp_path, 1, ext="jpg")
    out_file = tmp_path / "scores.npy"
    code, out, err = run([path, out_file] + tiny_args(tiny, "--mean_value", "104,117,123"), capsys)
    assert code == 0, err
    expected = reference_scores(*tiny, [pillow_rgb(path)], mean=[104, 117, 123], input_scale=0.01)
    saved = np.load(out_file)
    assert saved.shape == (1, CLASSES)
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-7)
    check_top5(printed_top5(out)[path], saved[0])
    assert "Classifying 1 inputs." in out


def test_classify_folder_with_synset_labels(tiny, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = write_images(str(folder), 3, ext="png")
    (folder / "notes.txt").write_text("not an image, and not a png")
    synsets = [f"n0{1440764 + i:07d} name{i}, other{i}" for i in range(CLASSES)]
    labels = tmp_path / "synset_words.txt"
    labels.write_text("\n".join(synsets) + "\n")
    out_file = tmp_path / "scores.npy"
    code, out, err = run([folder, out_file] + tiny_args(tiny, "--ext", "png", "--labels_file",
                                                         labels), capsys)
    assert code == 0, err
    images = [pillow_rgb(p) for p in sorted(paths)]
    expected = reference_scores(*tiny, images, input_scale=0.01)
    saved = np.load(out_file)
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-7)
    printed = printed_top5(out)
    assert list(printed) == sorted(paths)
    for path, scores in zip(sorted(paths), saved):
        check_top5(printed[path], scores, synsets)


def test_classify_list_file_centre_only_with_names(tiny, tmp_path, capsys):
    sub = tmp_path / "imgs"
    sub.mkdir()
    paths = write_images(str(sub), 2, seed=7)
    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/{os.path.basename(paths[0])} 3\n\n{paths[1]}\n")  # relative + label
    names = [f"thing {i}" for i in range(CLASSES)]
    labels = tmp_path / "names.txt"
    labels.write_text("\n".join(names))
    out_file = tmp_path / "scores.npy"
    code, out, err = run([listing, out_file] + tiny_args(tiny, "--center_only", "--labels_file",
                                                          labels, "--raw_scale", "200"), capsys)
    assert code == 0, err
    images = [pillow_rgb(p) for p in paths]
    expected = reference_scores(*tiny, images, False, raw_scale=200, input_scale=0.01)
    saved = np.load(out_file)
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-7)
    printed = printed_top5(out)
    assert len(printed) == 2
    for scores, lines in zip(saved, printed.values()):
        check_top5(lines, scores, names)


@pytest.mark.parametrize("kind", ["binaryproto", "npy"])
def test_classify_mean_file_uses_the_channel_means(tiny, tmp_path, capsys, kind):
    rng = np.random.default_rng(8)
    mean_image = rng.uniform(90, 130, (3, 16, 16)).astype(np.float32)
    mean_path = tmp_path / f"mean.{kind}"
    if kind == "npy":
        np.save(mean_path, mean_image)
    else:
        save_mean_file(str(mean_path), mean_image)
    (path,) = write_images(tmp_path, 1)
    out_file = tmp_path / "scores.npy"
    code, out, err = run([path, out_file] + tiny_args(tiny, "--mean_file", mean_path), capsys)
    assert code == 0, err
    expected = reference_scores(*tiny, [pillow_rgb(path)], mean=mean_image.mean(1).mean(1),
                                input_scale=0.01)
    np.testing.assert_allclose(np.load(out_file), expected, rtol=1e-5, atol=1e-7)


def test_classify_npy_input(tiny, tmp_path, capsys):
    rng = np.random.default_rng(9)
    images = rng.random((2,) + IMAGE_DIMS + (3,)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    out_file = tmp_path / "scores.npy"
    code, out, err = run([tmp_path / "images.npy", out_file] + tiny_args(tiny), capsys)
    assert code == 0, err
    np.testing.assert_allclose(np.load(out_file), reference_scores(*tiny, list(images),
                                                                   input_scale=0.01),
                               rtol=1e-5, atol=1e-7)


def test_classify_unreadable_image(tiny, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    code, out, err = run([bad, tmp_path / "o.npy"] + tiny_args(tiny), capsys)
    assert code == 1
    assert err.count("\n") == 1 and "broken.jpg" in err and "Traceback" not in err
    assert not (tmp_path / "o.npy").exists()


def test_classify_unreadable_image_in_a_subprocess_has_no_traceback(tiny, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_images(str(folder), 1)
    (folder / "zzz_truncated.png").write_bytes((folder / "img0.png").read_bytes()[:60])
    proc = subprocess.run([sys.executable, CLASSIFY, str(folder), str(tmp_path / "o.npy"),
                           "--ext", "png"] + tiny_args(tiny), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("classify.py: error: cannot read image file '")
    assert "zzz_truncated.png" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_classify_missing_model_and_weights(tiny, tmp_path, capsys):
    (path,) = write_images(tmp_path, 1)
    model, weights = tiny
    code, _, err = run([path, tmp_path / "o.npy", "--model_def", tmp_path / "none.prototxt",
                        "--pretrained_model", weights], capsys)
    assert code == 1 and "model definition (--model_def) not found" in err
    assert "none.prototxt" in err
    code, _, err = run([path, tmp_path / "o.npy", "--model_def", model,
                        "--pretrained_model", tmp_path / "none.caffemodel"], capsys)
    assert code == 1 and "weights file (--pretrained_model) not found" in err
    code, _, err = run([path, tmp_path / "o.npy", "--model_def", model], capsys)
    assert code == 1 and "--pretrained_model is required" in err
    # a prototxt given as weights: not a binary NetParameter
    code, _, err = run([path, tmp_path / "o.npy", "--model_def", model,
                        "--pretrained_model", model], capsys)
    assert code == 1 and "not a valid binary caffe.NetParameter" in err
    assert "Traceback" not in err


def test_classify_weights_that_do_not_fit_the_net(tiny, tmp_path, capsys):
    (path,) = write_images(tmp_path, 1)
    other = tmp_path / "five.prototxt"
    other.write_text(TINY_NET % 5)
    code, _, err = run([path, tmp_path / "o.npy", "--model_def", other,
                        "--pretrained_model", tiny[1]], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "layer 'fc'" in err and "7 36" in err and "5 36" in err


@pytest.mark.parametrize("extra,message", [
    (["--mean_file", "m.npy", "--mean_value", "1,2,3"], "either --mean_file or --mean_value"),
    (["--mean_value", "1,2"], "--mean_value has 2 values"),
    (["--mean_value", "a,b,c"], "comma-separated numbers"),
    (["--images_dim", "256"], "--images_dim needs 2 values"),
    (["--images_dim", "4,4"], "smaller than the net's input"),
    (["--channel_swap", "0,1"], "channel swap (0, 1) needs 3 entries"),
    (["--mean_file", "absent.binaryproto"], "mean file (--mean_file) not found"),
])
def test_classify_bad_options(tiny, tmp_path, capsys, extra, message):
    (path,) = write_images(tmp_path, 1)
    (tmp_path / "m.npy").write_bytes(b"")
    code, _, err = run([path, tmp_path / "o.npy"] + tiny_args(tiny) + extra, capsys)
    assert code == 1
    assert message in err and err.count("\n") == 1


def test_classify_labels_and_inputs_errors(tiny, tmp_path, capsys):
    (path,) = write_images(tmp_path, 1)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    code, _, err = run([path, tmp_path / "o.npy"] + tiny_args(tiny, "--labels_file", labels),
                       capsys)
    assert code == 1 and "has 3 labels; the net's output has 7 classes" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run([empty, tmp_path / "o.npy"] + tiny_args(tiny), capsys)
    assert code == 1 and "no '*.jpg' images in folder" in err
    code, _, err = run([tmp_path / "absent.png", tmp_path / "o.npy"] + tiny_args(tiny), capsys)
    assert code == 1 and "input not found" in err and "absent.png" in err
    listing = tmp_path / "list.txt"
    listing.write_text("missing_image.png\n")
    code, _, err = run([listing, tmp_path / "o.npy"] + tiny_args(tiny), capsys)
    assert code == 1 and "missing_image.png' not found" in err


def test_classify_resnet50_deploy(tmp_path, capsys):
    """The generated ResNet-50 deploy file through classify.py (random weights, centre crop)."""
    model = os.path.join(ROOT, "models", "resnet", "ResNet-50-deploy.prototxt")
    net = framework.Net(model, framework.TEST)
    randomize_params(net, seed=0)
    weights = tmp_path / "resnet50.caffemodel"
    net.save(str(weights))
    rng = np.random.default_rng(10)
    pixels = rng.integers(0, 256, (240, 250, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    out_file = tmp_path / "scores.npy"
    code, out, err = run([tmp_path / "photo.png", out_file, "--model_def", model,
                          "--pretrained_model", weights, "--images_dim", "240,250",
                          "--mean_value", "104,117,123", "--input_scale", "0.017",
                          "--center_only"], capsys)
    assert code == 0, err
    saved = np.load(out_file)
    assert saved.shape == (1, 1000)
    # direct forward on the centre 224 crop, RGB->BGR, x255, minus the mean, x0.017
    crop = pixels[8:232, 13:237].astype(np.float32) / np.float32(255)
    x = (crop[:, :, ::-1] * np.float32(255) - np.array([104, 117, 123], np.float32))
    x = x * np.float32(0.017)
    direct = net.forward(data=x.transpose(2, 0, 1)[None])["prob"]
    np.testing.assert_allclose(saved, direct, rtol=1e-4, atol=1e-6)
    check_top5(printed_top5(out)[str(tmp_path / "photo.png")], saved[0])
