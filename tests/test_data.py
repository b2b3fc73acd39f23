"""Data layers, the data transformer and the database readers.

Fixtures written by real Caffe live in ../shared/caffe-fixtures (see its README).
"""
import gc
import gzip
import os
import shutil
import stat
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import layers  # noqa: F401  (registers the layer types)
from framework import set_random_seed
from framework.blob import Blob
from framework.db import DatabaseError, open_db
from framework.errors import CaffeError, LayerError
from framework.layer import create_layer
from layers.data_transformer import (DataTransformer, array_to_datum, datum_to_array, decode_image,
                                     resize_linear)
from proto import caffe_pb2

TRAIN, TEST = 0, 1


# -- helpers ----------------------------------------------------------------------
@pytest.fixture
def fixtures(shared_dir):
    return os.path.join(shared_dir, "caffe-fixtures")


def read_idx(path):
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


@pytest.fixture
def digits(fixtures):
    return (read_idx(os.path.join(fixtures, "mnist_200-images-idx3-ubyte.gz")),
            read_idx(os.path.join(fixtures, "mnist_200-labels-idx1-ubyte.gz")))


def make_layer(text, phase=TRAIN, ntop=2, nbottom=0, dtype=np.float32):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(text, lp)
    layer = create_layer(lp, phase)
    bottom = [Blob((1,), dtype=dtype) for _ in range(nbottom)]
    top = [Blob((1,), dtype=dtype) for _ in range(ntop)]
    return layer, bottom, top


def setup(text, phase=TRAIN, ntop=2, dtype=np.float32):
    layer, bottom, top = make_layer(text, phase, ntop, dtype=dtype)
    layer.setup_layer(bottom, top)
    return layer, top


def data_text(source, batch=16, backend="LMDB", extra="", transform=""):
    backend_line = f"backend: {backend}" if backend else ""
    tops = 'top: "data" top: "label"'
    return (f'name: "mnist" type: "Data" {tops} transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: {batch} {backend_line} {extra} }}')


def copy_db(src, dst):
    shutil.copytree(src, dst)
    for name in os.listdir(dst):  # the fixture files are read-only
        os.chmod(os.path.join(dst, name), stat.S_IRUSR | stat.S_IWUSR)
    return str(dst)


def transform_param(text):
    p = caffe_pb2.TransformationParameter()
    text_format.Parse(text, p)
    return p


def write_mean(path, mean):
    blob = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    blob.data.extend(mean.ravel().tolist())
    with open(path, "wb") as f:
        f.write(blob.SerializeToString())


def reference_transform(image, scale=1.0, mean=None, mean_values=None, crop=0, h_off=0, w_off=0, flip=False):
    """Caffe's Transform(Datum) loop, element by element (data_transformer.cpp)."""
    c, h, w = image.shape
    oh, ow = (crop, crop) if crop else (h, w)
    out = np.zeros((c, oh, ow), dtype=np.float32)
    for ci in range(c):
        for y in range(oh):
            for x in range(ow):
                v = np.float32(image[ci, y + h_off, x + w_off])
                if mean is not None:
                    v = np.float32(v - mean[ci, y + h_off, x + w_off])
                elif mean_values is not None:
                    mv = mean_values[0] if len(mean_values) == 1 else mean_values[ci]
                    v = np.float32(v - np.float32(mv))
                v = np.float32(v * np.float32(scale))
                out[ci, y, (ow - 1 - x) if flip else x] = v
    return out


# -- Data layer -------------------------------------------------------------------
def test_data_layer_reads_caffe_lmdb(fixtures, digits):
    images, labels = digits
    layer, top = setup(data_text(os.path.join(fixtures, "mnist_200_lmdb")))
    assert top[0].shape == (16, 1, 28, 28) and top[1].shape == (16,)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, images[:16, None].astype(np.float32))
    np.testing.assert_array_equal(top[1].data, labels[:16])
    layer.forward([], top)
    np.testing.assert_array_equal(top[1].data, labels[16:32])
    layer.close()


def test_data_layer_reads_caffe_leveldb_by_default_backend(fixtures, digits, tmp_path):
    images, labels = digits
    db = copy_db(os.path.join(fixtures, "mnist_200_leveldb"), tmp_path / "db")
    # backend omitted: LEVELDB is caffe.proto's default.
    layer, top = setup(data_text(db, backend="", transform="scale: 0.00390625"))
    layer.forward([], top)
    expected = images[:16, None].astype(np.float32) * np.float32(0.00390625)
    np.testing.assert_array_equal(top[0].data, expected)
    np.testing.assert_array_equal(top[1].data, labels[:16])
    layer.close()


def test_data_layer_single_top_and_wraparound(fixtures, digits):
    images, labels = digits
    layer, top = setup(data_text(os.path.join(fixtures, "mnist_200_lmdb"), batch=64, extra="prefetch: 0"),
                       ntop=1)
    for _ in range(4):
        layer.forward([], top)
    # batch 4 holds records 192..199 then wraps to 0..55
    order = np.r_[192:200, 0:56]
    np.testing.assert_array_equal(top[0].data, images[order, None].astype(np.float32))


def test_data_layer_relative_source_uses_cwd(fixtures, digits, monkeypatch, tmp_path):
    monkeypatch.chdir(fixtures)
    layer, top = setup(data_text("mnist_200_lmdb", batch=4))
    layer.forward([], top)
    np.testing.assert_array_equal(top[1].data, digits[1][:4])
    layer.close()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerError, match="mnist_200_lmdb"):
        setup(data_text("mnist_200_lmdb", batch=4))


def test_prefetch_matches_synchronous_reading_and_stops(fixtures):
    source = os.path.join(fixtures, "mnist_200_lmdb")
    transform = "mirror: true crop_size: 24 scale: 0.5"
    batches = {}
    for prefetch in (0, 3):
        set_random_seed(7)
        layer, top = setup(data_text(source, batch=24, extra=f"prefetch: {prefetch}", transform=transform))
        got = []
        for _ in range(10):  # crosses the end of the 200 records
            layer.forward([], top)
            got.append((top[0].data.copy(), top[1].data.copy()))
        batches[prefetch] = got
        if prefetch:
            prefetcher = layer.prefetcher
            assert prefetcher.alive
            layer.close()
            assert not prefetcher.alive
            with pytest.raises(CaffeError):
                prefetcher.next()
    for (d0, l0), (d1, l1) in zip(batches[0], batches[3]):
        np.testing.assert_array_equal(d0, d1)
        np.testing.assert_array_equal(l0, l1)
    # the transform was really random: both mirrored and plain items occurred
    assert not all(np.array_equal(a[0], batches[0][0][0][0]) for a in batches[0])


def test_prefetch_thread_stops_when_layer_is_collected(fixtures):
    layer, top = setup(data_text(os.path.join(fixtures, "mnist_200_lmdb"), batch=8))
    layer.forward([], top)
    prefetcher = layer.prefetcher
    del layer
    gc.collect()
    prefetcher._thread.join(5)
    assert not prefetcher.alive


def test_data_layer_transform_reference(fixtures, digits, tmp_path):
    images, _ = digits
    mean = np.random.default_rng(0).uniform(0, 255, (1, 28, 28)).astype(np.float32)
    write_mean(tmp_path / "mean.binaryproto", mean)
    text = data_text(os.path.join(fixtures, "mnist_200_lmdb"), batch=5,
                     transform=f'crop_size: 23 scale: 0.01 mean_file: "{tmp_path / "mean.binaryproto"}"')
    layer, top = setup(text, phase=TEST)
    assert top[0].shape == (5, 1, 23, 23)
    layer.forward([], top)
    for i in range(5):  # TEST: centre crop at ((28 - 23) // 2, (28 - 23) // 2) = (2, 2)
        ref = reference_transform(images[i][None], 0.01, mean=mean, crop=23, h_off=2, w_off=2)
        np.testing.assert_array_equal(top[0].data[i], ref)
    layer.close()


def test_data_layer_errors(fixtures, tmp_path, monkeypatch):
    missing = str(tmp_path / "no_such_lmdb")
    with pytest.raises(LayerError, match="no_such_lmdb") as info:
        setup(data_text(missing))
    assert "'mnist'" in str(info.value)
    (tmp_path / "plain_file").write_text("x")
    with pytest.raises(LayerError, match="plain_file.*not a lmdb|plain_file.*not an? (LMDB|lmdb)"):
        setup(data_text(str(tmp_path / "plain_file")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LayerError, match="empty_dir.*not an LMDB"):
        setup(data_text(str(tmp_path / "empty_dir")))
    with pytest.raises(LayerError, match="empty_dir.*not a LevelDB"):
        setup(data_text(str(tmp_path / "empty_dir"), backend="LEVELDB"))
    source = os.path.join(fixtures, "mnist_200_lmdb")
    with pytest.raises(LayerError, match="batch_size must be positive, got 0"):
        setup(data_text(source, batch=0))
    with pytest.raises(LayerError, match="data_param.scale"):
        setup(data_text(source, extra="scale: 0.5"))
    with pytest.raises(LayerError, match="crop_size 30 is larger"):
        setup(data_text(source, transform="crop_size: 30"))
    layer, bottom, top = make_layer(data_text(source), ntop=3)
    with pytest.raises(LayerError, match="at most 2 top"):
        layer.setup_layer(bottom, top)
    monkeypatch.setitem(sys.modules, "plyvel", None)  # plyvel not installed
    with pytest.raises(LayerError, match="pip install plyvel"):
        setup(data_text(str(tmp_path / "empty_dir"), backend="LEVELDB"))


def test_data_layer_datum_size_mismatch_names_layer(tmp_path):
    path = str(tmp_path / "bad_lmdb")
    with open_db(path, "lmdb", "new") as db:
        txn = db.transaction()
        txn.put(b"0", array_to_datum(np.zeros((1, 4, 4), np.uint8), 0).SerializeToString())
        txn.put(b"1", array_to_datum(np.zeros((1, 5, 4), np.uint8), 1).SerializeToString())
        bad = array_to_datum(np.zeros((1, 4, 4), np.uint8), 2)
        bad.data = b"\0" * 7
        txn.put(b"2", bad.SerializeToString())
        txn.commit()
    layer, top = setup(data_text(path, batch=2, extra="prefetch: 0"))
    with pytest.raises(LayerError, match=r"'mnist'.*shape"):
        layer.forward([], top)
    layer, top = setup(data_text(path, batch=1, extra="prefetch: 2"))
    layer.forward([], top)
    layer.forward([], top)
    with pytest.raises(LayerError, match=r"'mnist'.*7 bytes"):  # raised in the thread, seen in forward
        layer.forward([], top)
    layer.close()


# -- databases --------------------------------------------------------------------
def test_lmdb_and_leveldb_roundtrip_in_key_order(tmp_path):
    records = {b"b": b"2", b"a": b"1", b"c": b"\x00\xff"}
    for backend in ("lmdb", "LEVELDB", 1, 0):
        path = str(tmp_path / f"db_{backend}")
        with open_db(path, backend, "new") as db:
            txn = db.transaction()
            for k, v in records.items():
                txn.put(k, v)
            txn.commit()
        with pytest.raises(DatabaseError, match="already exists"):
            open_db(path, backend, "new")
        with open_db(path, backend) as db:
            assert list(db) == sorted(records.items())
            cursor = db.cursor(wrap=True)
            assert cursor.read(5) == [b"1", b"2", b"\x00\xff", b"1", b"2"]
            assert cursor.epochs == 1
            with pytest.raises(DatabaseError, match="reading only"):
                db.transaction()
    with pytest.raises(DatabaseError, match="unknown database backend 'rocksdb'"):
        open_db(path, "rocksdb")


def test_lmdb_grows_its_map(tmp_path, monkeypatch):
    import framework.db as fdb
    monkeypatch.setattr(fdb, "_LMDB_INITIAL_MAP_SIZE", 1 << 16)
    with open_db(str(tmp_path / "big"), "lmdb", "new") as db:
        txn = db.transaction()
        for i in range(64):
            txn.put(b"%04d" % i, bytes(4096))
        txn.commit()
    with open_db(str(tmp_path / "big"), "lmdb") as db:
        assert len(db) == 64 and db.get(b"0063") == bytes(4096)


# -- transformer ------------------------------------------------------------------
def test_transformer_scale_and_mean_values():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 3, 5, 4), dtype=np.uint8)
    t = DataTransformer(transform_param("scale: 0.3 mean_value: 10 mean_value: 20 mean_value: 30.5"), TEST)
    out = t.transform(x)
    assert out.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(out[i], reference_transform(x[i], 0.3, mean_values=[10, 20, 30.5]))
    t1 = DataTransformer(transform_param("mean_value: 100"), TRAIN)
    np.testing.assert_array_equal(t1.transform(x)[1], reference_transform(x[1], mean_values=[100]))
    t2 = DataTransformer(transform_param("mean_value: 1 mean_value: 2"), TEST)
    with pytest.raises(CaffeError, match="either 1 mean_value or as many as channels"):
        t2.transform(x)


def test_transformer_float64_and_float_data():
    x = np.random.default_rng(2).standard_normal((2, 2, 3, 3)).astype(np.float32)
    t = DataTransformer(transform_param("scale: 2"), TEST)
    out = t.transform(x, dtype=np.float64)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, x.astype(np.float64) * 2)
    datum = array_to_datum(x[0], label=3)
    assert len(datum.float_data) == 18 and not datum.data
    np.testing.assert_array_equal(datum_to_array(datum), x[0])


def test_transformer_train_crop_is_random_test_crop_is_centred(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (40, 2, 7, 6), dtype=np.uint8)
    mean = rng.uniform(0, 255, (2, 7, 6)).astype(np.float32)
    write_mean(tmp_path / "m.binaryproto", mean)
    text = f'crop_size: 4 scale: 0.5 mean_file: "{tmp_path / "m.binaryproto"}"'
    test_out = DataTransformer(transform_param(text), TEST).transform(x)
    for i in range(3):
        ref = reference_transform(x[i], 0.5, mean=mean, crop=4, h_off=1, w_off=1)
        np.testing.assert_array_equal(test_out[i], ref)
    set_random_seed(11)
    train_out = DataTransformer(transform_param(text), TRAIN).transform(x)
    offsets = set()
    for i in range(len(x)):
        found = [(h, w) for h in range(4) for w in range(3)
                 if np.array_equal(train_out[i], reference_transform(x[i], 0.5, mean=mean, crop=4,
                                                                     h_off=h, w_off=w))]
        assert found, f"item {i} is no crop of its image"
        offsets.add(found[0])
    assert len(offsets) > 4  # random offsets, not one fixed window


def test_transformer_mirror_is_random_in_both_phases():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (32, 3, 3, 5), dtype=np.uint8)
    for phase in (TRAIN, TEST):
        set_random_seed(5)
        out = DataTransformer(transform_param("mirror: true"), phase).transform(x)
        flipped = []
        for i in range(len(x)):
            plain, mirrored = reference_transform(x[i]), reference_transform(x[i], flip=True)
            assert np.array_equal(out[i], plain) or np.array_equal(out[i], mirrored)
            flipped.append(np.array_equal(out[i], mirrored))
        assert 0 < sum(flipped) < len(x)


def test_transformer_is_reproducible_with_seed():
    x = np.random.default_rng(5).integers(0, 256, (8, 1, 9, 9), dtype=np.uint8)
    outs = []
    for _ in range(2):
        set_random_seed(99)
        outs.append(DataTransformer(transform_param("mirror: true crop_size: 5"), TRAIN).transform(x))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_transformer_parameter_errors(tmp_path):
    write_mean(tmp_path / "m.binaryproto", np.zeros((1, 4, 4), np.float32))
    with pytest.raises(CaffeError, match="cannot specify mean_file and mean_value at the same time"):
        DataTransformer(transform_param(f'mean_file: "{tmp_path / "m.binaryproto"}" mean_value: 3'), TEST)
    with pytest.raises(CaffeError, match="force_color and force_gray"):
        DataTransformer(transform_param("force_color: true force_gray: true"), TEST)
    with pytest.raises(CaffeError, match="nope.binaryproto"):
        DataTransformer(transform_param(f'mean_file: "{tmp_path / "nope.binaryproto"}"'), TEST)
    t = DataTransformer(transform_param(f'mean_file: "{tmp_path / "m.binaryproto"}"'), TEST)
    with pytest.raises(CaffeError, match="uncropped size"):
        t.transform(np.zeros((1, 1, 5, 5), np.uint8))


def _png_bytes(rgb):
    from PIL import Image
    import io
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_datum_decodes_to_bgr():
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[0, 0] = (10, 20, 30)
    datum = caffe_pb2.Datum(data=_png_bytes(rgb), label=1, encoded=True)
    arr = datum_to_array(datum)
    assert arr.shape == (3, 3, 4)
    np.testing.assert_array_equal(arr[:, 0, 0], [30, 20, 10])  # B, G, R
    np.testing.assert_array_equal(arr[2, 1:], 200)
    np.testing.assert_array_equal(arr[0, 1:], 0)
    gray = DataTransformer(transform_param("force_gray: true"), TEST).transform_datums([datum])
    assert gray.shape == (1, 1, 3, 4)
    assert gray[0, 0, 1, 1] == round(200 * 0.299)
    gray_png = caffe_pb2.Datum(data=_png_bytes(np.full((2, 2), 7, np.uint8)), encoded=True)
    assert datum_to_array(gray_png).shape == (1, 2, 2)  # native kind kept
    color = DataTransformer(transform_param("force_color: true"), TEST).transform_datums([gray_png])
    np.testing.assert_array_equal(color, np.full((1, 3, 2, 2), 7, np.float32))
    with pytest.raises(CaffeError, match="could not decode"):
        decode_image(b"not an image")


def test_resize_linear_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(6)
    for (h, w, nh, nw, c) in [(28, 28, 20, 20, 3), (50, 37, 13, 29, 1), (40, 30, 20, 15, 3), (9, 7, 16, 11, 3)]:
        img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        ref = cv2.resize(img if c == 3 else img[:, :, 0], (nw, nh)).reshape(nh, nw, c)
        ours = resize_linear(img, nh, nw)
        assert np.abs(ours.astype(int) - ref).max() <= 1
        if h > nh:  # downscaling: no clamped rows except the last, so nearly all agree exactly
            assert (ours != ref).mean() < 0.01


def test_resize_linear_reference():
    img = np.array([[0, 100], [200, 50]], np.uint8)[:, :, None]
    np.testing.assert_array_equal(resize_linear(img, 2, 2), img)
    # 2x reduction is area averaging with rounding: (0 + 100 + 200 + 50 + 2) >> 2 = 88
    assert resize_linear(img, 1, 1)[0, 0, 0] == 88
    up = resize_linear(np.array([[0, 255]], np.uint8)[:, :, None], 1, 4)[0, :, 0]
    # half-pixel centres: sources -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    np.testing.assert_array_equal(up, [0, 64, 191, 255])


# -- ImageData --------------------------------------------------------------------
def _write_images(tmp_path):
    from PIL import Image
    colours = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}
    (tmp_path / "img").mkdir()
    for name, rgb in colours.items():
        arr = np.zeros((5, 4, 3), np.uint8)
        arr[...] = rgb
        arr[0, 0] = (1, 2, 3)
        Image.fromarray(arr).save(tmp_path / "img" / name)
    (tmp_path / "list.txt").write_text("red.png 0\ngreen.png 1\nblue.png 2\n")
    return tmp_path


def image_text(tmp_path, batch=2, extra="", transform=""):
    return (f'name: "images" type: "ImageData" top: "data" top: "label" transform_param {{ {transform} }} '
            f'image_data_param {{ source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path / "img"}/" '
            f'batch_size: {batch} {extra} }}')


def test_image_data_bgr_labels_and_wrap(tmp_path):
    _write_images(tmp_path)
    layer, top = setup(image_text(tmp_path))
    assert top[0].shape == (2, 3, 5, 4) and top[1].shape == (2,)
    layer.forward([], top)
    red, green = top[0].data
    np.testing.assert_array_equal(red[:, 2, 2], [0, 0, 255])  # BGR: red is channel 2
    np.testing.assert_array_equal(green[:, 2, 2], [0, 255, 0])
    np.testing.assert_array_equal(red[:, 0, 0], [3, 2, 1])
    np.testing.assert_array_equal(top[1].data, [0, 1])
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data[0][:, 2, 2], [255, 0, 0])  # blue
    np.testing.assert_array_equal(top[1].data, [2, 0])  # wrapped to the first image
    layer.close()


def test_image_data_gray_resize_and_transform(tmp_path):
    _write_images(tmp_path)
    layer, top = setup(image_text(tmp_path, batch=3, extra="is_color: false new_height: 10 new_width: 8",
                                  transform="scale: 0.5 mirror: false"), phase=TEST)
    assert top[0].shape == (3, 1, 10, 8)
    layer.forward([], top)
    # gray = round(0.299 R + 0.587 G + 0.114 B) in Pillow's fixed point; flat image stays flat
    np.testing.assert_array_equal(top[0].data[0, 0, 5:, :], np.float32(76) * np.float32(0.5))
    np.testing.assert_array_equal(top[0].data[1, 0, 5:, :], np.float32(150) * np.float32(0.5))
    layer.close()


def test_image_data_shuffle_is_a_permutation(tmp_path):
    _write_images(tmp_path)
    set_random_seed(3)
    layer, top = setup(image_text(tmp_path, batch=3, extra="shuffle: true"))
    layer.forward([], top)
    assert sorted(top[1].data.tolist()) == [0, 1, 2]
    for img, label in zip(top[0].data, top[1].data.astype(int)):  # images stay with their labels
        assert img[2 - label, 2, 2] == 255
    layer.close()


def test_image_data_errors(tmp_path):
    _write_images(tmp_path)
    with pytest.raises(LayerError, match="missing_list.txt"):
        setup(image_text(tmp_path).replace("list.txt", "missing_list.txt"))
    (tmp_path / "list.txt").write_text("red.png 0\nno_label_here\n")
    with pytest.raises(LayerError, match=r"line 2 of source '.*list.txt'"):
        setup(image_text(tmp_path))
    (tmp_path / "list.txt").write_text("red.png 0\nmissing.png 1\n")
    layer, top = setup(image_text(tmp_path).replace("image_data_param", "data_param { prefetch: 0 } image_data_param"))
    with pytest.raises(LayerError, match=r"'images'.*missing.png"):
        layer.forward([], top)
    (tmp_path / "list.txt").write_text("red.png 0\n")
    with pytest.raises(LayerError, match="new_height .* and new_width .* must be set together"):
        setup(image_text(tmp_path, extra="new_height: 4"))
    with pytest.raises(LayerError, match="image_data_param.crop_size"):
        setup(image_text(tmp_path, extra="crop_size: 2"))


# -- HDF5 -------------------------------------------------------------------------
def _write_h5(path, data, label):
    import h5py
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=label)


def hdf5_text(source, batch, extra=""):
    return (f'name: "h5" type: "HDF5Data" top: "data" top: "label" '
            f'hdf5_data_param {{ source: "{source}" batch_size: {batch} {extra} }}')


def test_hdf5_data_reads_rows_across_files_and_wraps(tmp_path):
    rng = np.random.default_rng(7)
    d1, d2 = rng.standard_normal((5, 2, 3)), rng.standard_normal((3, 2, 3))
    l1, l2 = np.arange(5), np.arange(5, 8)
    _write_h5(tmp_path / "a.h5", d1, l1)
    _write_h5(tmp_path / "b.h5", d2.astype(np.float32), l2.astype(np.int32))
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n  {tmp_path / 'b.h5'}\n")
    layer, top = setup(hdf5_text(tmp_path / "list.txt", 3))
    assert top[0].shape == (3, 2, 3) and top[1].shape == (3,)
    all_data = np.concatenate([d1, d2]).astype(np.float32)
    all_label = np.r_[l1, l2].astype(np.float32)
    for start in (0, 3, 6, 9):
        layer.forward([], top)
        rows = np.arange(start, start + 3) % 8
        np.testing.assert_array_equal(top[0].data, all_data[rows])
        np.testing.assert_array_equal(top[1].data, all_label[rows])


def test_hdf5_shuffle_keeps_rows_together(tmp_path):
    data = np.arange(6, dtype=np.float32)[:, None] * 10
    _write_h5(tmp_path / "a.h5", data, np.arange(6))
    (tmp_path / "list.txt").write_text(str(tmp_path / "a.h5"))
    set_random_seed(1)
    layer, top = setup(hdf5_text(tmp_path / "list.txt", 6, "shuffle: true"))
    seen = []
    for _ in range(3):
        layer.forward([], top)
        np.testing.assert_array_equal(top[0].data[:, 0], top[1].data * 10)
        assert sorted(top[1].data) == list(range(6))
        seen.append(tuple(top[1].data))
    assert len(set(seen + [tuple(range(6))])) > 1


def test_hdf5_output_roundtrip(tmp_path):
    import h5py
    rng = np.random.default_rng(8)
    data, label = rng.standard_normal((4, 3, 2, 2)), rng.integers(0, 9, (4,))
    _write_h5(tmp_path / "in.h5", data, label)
    (tmp_path / "list.txt").write_text(str(tmp_path / "in.h5"))
    reader, top = setup(hdf5_text(tmp_path / "list.txt", 4))
    reader.forward([], top)
    out_file = tmp_path / "out.h5"
    writer, bottom, no_top = make_layer(
        f'name: "out" type: "HDF5Output" bottom: "data" bottom: "label" '
        f'hdf5_output_param {{ file_name: "{out_file}" }}', ntop=0, nbottom=0)
    writer.setup_layer(top, [])
    assert out_file.exists()
    writer.forward(top, [])
    with h5py.File(out_file, "r") as f:
        np.testing.assert_array_equal(f["data"][...], data.astype(np.float32))
        assert f["label"].shape == (4, 1, 1, 1)  # legacy 4-D shape
        np.testing.assert_array_equal(f["label"][...].ravel(), label.astype(np.float32))
    with pytest.raises(LayerError, match="one batch per file"):
        writer.forward(top, [])
    bad = [Blob((4, 3)), Blob((3,))]
    with pytest.raises(LayerError, match="same batch size"):
        writer.forward(bad, [])


def test_hdf5_errors(tmp_path):
    with pytest.raises(LayerError, match="nothing.txt"):
        setup(hdf5_text(tmp_path / "nothing.txt", 2))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(LayerError, match="at least 1 HDF5 filename"):
        setup(hdf5_text(tmp_path / "empty.txt", 2))
    _write_h5(tmp_path / "a.h5", np.zeros((3, 2)), np.zeros(4))
    (tmp_path / "list.txt").write_text(str(tmp_path / "a.h5"))
    with pytest.raises(LayerError, match=r"'h5'.*different numbers of rows"):
        setup(hdf5_text(tmp_path / "list.txt", 2))
    with pytest.raises(LayerError, match="no dataset 'other'"):
        layer, bottom, top = make_layer(hdf5_text(tmp_path / "list.txt", 2).replace('top: "label"',
                                                                                  'top: "other"'))
        layer.setup_layer(bottom, top)
    with pytest.raises(LayerError, match="does not transform data"):
        setup(hdf5_text(tmp_path / "list.txt", 2) + " transform_param { scale: 2 }")
    (tmp_path / "list2.txt").write_text(str(tmp_path / "missing.h5"))
    with pytest.raises(LayerError, match="missing.h5"):
        setup(hdf5_text(tmp_path / "list2.txt", 2))


# -- MemoryData -------------------------------------------------------------------
MEMORY = ('name: "mem" type: "MemoryData" top: "data" top: "label" '
          'memory_data_param { batch_size: 2 channels: 3 height: 2 width: 1 }')


def test_memory_data_serves_batches_and_wraps():
    layer, top = setup(MEMORY)
    assert top[0].shape == (2, 3, 2, 1) and top[1].shape == (2,)
    data = np.arange(4 * 6, dtype=np.float64).reshape(4, 3, 2, 1)
    labels = np.array([5, 6, 7, 8])
    layer.set_input_arrays(data, labels)
    data[...] = -1  # the layer keeps its own copy
    expected = np.arange(24, dtype=np.float32).reshape(4, 3, 2, 1)
    for start in (0, 2, 0):
        layer.forward([], top)
        np.testing.assert_array_equal(top[0].data, expected[start:start + 2])
        assert top[1].shape == (2, 1, 1, 1)
        np.testing.assert_array_equal(top[1].data.ravel(), [5 + start, 6 + start])


def test_memory_data_add_datum_vector_transforms():
    layer, top = setup(MEMORY.replace("top: \"label\"", "top: \"label\" transform_param { scale: 2 }"))
    x = np.arange(12, dtype=np.uint8).reshape(2, 3, 2, 1)
    layer.add_datum_vector([array_to_datum(x[0], 4), array_to_datum(x[1], 9)])
    with pytest.raises(LayerError, match="until the current data has been consumed"):
        layer.add_datum_vector([array_to_datum(x[0], 4), array_to_datum(x[1], 9)])
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, x.astype(np.float32) * 2)
    np.testing.assert_array_equal(top[1].data.ravel(), [4, 9])


def test_memory_data_errors():
    layer, top = setup(MEMORY)
    with pytest.raises(LayerError, match="'mem'.*set_input_arrays"):
        layer.forward([], top)
    with pytest.raises(LayerError, match="multiple of the batch size"):
        layer.set_input_arrays(np.zeros((3, 3, 2, 1)), np.zeros(3))
    with pytest.raises(LayerError, match=r"shape \(n, 3, 2, 1\)"):
        layer.set_input_arrays(np.zeros((2, 3, 1, 2)), np.zeros(2))
    with pytest.raises(LayerError, match="same first dimension"):
        layer.set_input_arrays(np.zeros((2, 3, 2, 1)), np.zeros(4))
    with pytest.raises(LayerError, match="must be specified and positive"):
        setup(MEMORY.replace("height: 2", "height: 0"))


def test_data_layers_have_no_backward():
    from framework.layer import LAYER_REGISTRY
    for name in ("Data", "ImageData", "HDF5Data", "HDF5Output", "MemoryData"):
        assert LAYER_REGISTRY[name].has_backward is False


def test_net_from_prototxt_elsewhere_reads_source_relative_to_cwd(fixtures, digits, tmp_path, monkeypatch):
    from framework.net import Net
    (tmp_path / "nets").mkdir()
    prototxt = tmp_path / "nets" / "reader.prototxt"
    prototxt.write_text('name: "reader"\n'
                        'layer { name: "mnist" type: "Data" top: "data" top: "label"\n'
                        '  transform_param { scale: 0.00390625 }\n'
                        '  data_param { source: "mnist_200_lmdb" batch_size: 8 backend: LMDB } }\n')
    monkeypatch.chdir(fixtures)
    net = Net(str(prototxt), TEST)
    out = net.forward()
    np.testing.assert_array_equal(out["label"], digits[1][:8])
    np.testing.assert_array_equal(out["data"][:, 0], digits[0][:8] * np.float32(0.00390625))
    for layer in net.layers:
        layer.close()


def test_two_readers_of_one_leveldb_in_a_process(fixtures, digits, tmp_path):
    db = copy_db(os.path.join(fixtures, "mnist_200_leveldb"), tmp_path / "db")
    first, top1 = setup(data_text(db, backend="LEVELDB", batch=4), phase=TRAIN)
    second, top2 = setup(data_text(db, backend="LEVELDB", batch=4), phase=TEST)
    for layer, top in ((first, top1), (second, top2), (first, top1)):
        layer.forward([], top)
    np.testing.assert_array_equal(top1[1].data, digits[1][4:8])
    np.testing.assert_array_equal(top2[1].data, digits[1][:4])
    first.close()
    second.close()


def test_data_layer_rand_skip(fixtures, digits):
    labels = digits[1]
    set_random_seed(4)
    layer, top = setup(data_text(os.path.join(fixtures, "mnist_200_lmdb"), batch=12, extra="rand_skip: 10"))
    layer.forward([], top)
    layer.close()
    images = digits[0]
    skips = [s for s in range(10) if np.array_equal(top[0].data[:, 0], images[s:s + 12])]
    assert len(skips) == 1 and np.array_equal(top[1].data, labels[skips[0]:skips[0] + 12])
