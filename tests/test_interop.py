"""Interoperability with real Caffe and with OpenCV's Caffe importer.

Files written by BVLC Caffe (../shared/caffe-fixtures, see its README.md) must load
here and give Caffe's numbers; files written here must load in OpenCV
(cv2.dnn.readNetFromCaffe) and give ours; a ResNet-152-sized .caffemodel (~230 MB)
must write and read back quickly without holding several copies of the weights.
"""
import gzip
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import framework
from framework import io as caffe_io
from framework.net import read_net_param
from model_utils import randomize_params
from proto import caffe_pb2



def _cv2():
    return pytest.importorskip("cv2", reason='OpenCV interop needs: pip install "opencv-python-headless<5"')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fixtures(shared_dir):
    return os.path.join(shared_dir, "caffe-fixtures")


def _model(shared_dir, relpath):
    return os.path.join(shared_dir, "caffe-models", relpath)


def _lenet_param(shared_dir, batch):
    """lenet.prototxt with its Input batch resized (as pycaffe's reshape before the reference run)."""
    param = read_net_param(_model(shared_dir, "bvlc/examples/mnist/lenet.prototxt"))
    assert param.layer[0].type == "Input"
    param.layer[0].input_param.shape[0].dim[0] = batch
    param.state.phase = caffe_pb2.TEST
    return param


def _reference(shared_dir):
    ref = np.load(os.path.join(_fixtures(shared_dir), "lenet_iter_20_first16.npz"))
    x = (ref["pixels"].astype(np.float32) * np.float32(ref["scale"]))[:, None]
    return x, ref


def _relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# -- Caffe-written files ------------------------------------------------------------

@pytest.mark.parametrize("weights", ["lenet_iter_20.caffemodel", "lenet_iter_20_v1.caffemodel"])
def test_caffe_lenet_weights_reproduce_pycaffe_outputs(shared_dir, weights):
    x, ref = _reference(shared_dir)
    net = framework.Net(_lenet_param(shared_dir, 16), weights=os.path.join(_fixtures(shared_dir), weights))
    assert net.blobs["data"].shape == (16, 1, 28, 28)
    out = net.forward(data=x, blobs=["ip2"])
    np.testing.assert_allclose(out["ip2"], ref["ip2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["prob"], ref["prob"], rtol=1e-5, atol=1e-6)
    assert (out["prob"].argmax(axis=1) == ref["prob"].argmax(axis=1)).all()


def test_caffe_mean_binaryproto_is_the_mean_of_the_idx_digits(shared_dir):
    mean = caffe_io.load_mean_file(os.path.join(_fixtures(shared_dir), "mean.binaryproto"))
    assert mean.shape == (1, 28, 28) and mean.dtype == np.float32
    with gzip.open(os.path.join(_fixtures(shared_dir), "mnist_200-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    magic, count, rows, cols = np.frombuffer(raw[:16], ">i4")
    assert (magic, count, rows, cols) == (2051, 200, 28, 28)  # IDX header: big-endian int32s
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)
    np.testing.assert_allclose(mean[0], images.mean(axis=0, dtype=np.float64), rtol=1e-6)
    assert 0 < mean.max() <= 255 and mean.min() == 0  # MNIST borders stay black


def test_caffe_solverstate_matches_the_net_and_restores(shared_dir, tmp_path, monkeypatch):
    folder = tmp_path / "fixtures"
    shutil.copytree(_fixtures(shared_dir), folder)  # the Data layer opens the LMDB: work on a copy
    state = caffe_io.read_binary_proto(folder / "lenet_iter_20.solverstate", caffe_pb2.SolverState)
    assert state.iter == 20 and len(state.history) == 8
    assert state.learned_net == "lenet_iter_20.caffemodel"
    history = [caffe_io.blob_to_array(h) for h in state.history]
    net = framework.Net(_lenet_param(shared_dir, 1), weights=str(folder / "lenet_iter_20.caffemodel"))
    params = [blob for blobs in net.params.values() for blob in blobs]
    assert [h.shape for h in history] == [p.shape for p in params]
    assert all(np.abs(h).max() > 0 for h in history)  # momentum after 20 steps is non-zero

    monkeypatch.chdir(folder)  # paths in the solver and the state are relative to the folder
    solver = framework.get_solver("lenet_solver.prototxt")
    solver.restore("lenet_iter_20.solverstate")
    assert solver.iter == 20
    assert len(solver.history) == 8
    for restored, expected in zip(solver.history, history):
        np.testing.assert_array_equal(restored, expected)
    for name, blobs in net.params.items():
        for restored, expected in zip(solver.net.params[name], blobs):
            np.testing.assert_array_equal(restored.data, expected.data)


# -- OpenCV reads what we write --------------------------------------------------------

def test_opencv_reads_the_caffe_fixture(shared_dir):
    """Control: OpenCV itself agrees with pycaffe's numbers on Caffe's own file."""
    cv2 = _cv2()
    x, ref = _reference(shared_dir)
    cv_net = cv2.dnn.readNetFromCaffe(_model(shared_dir, "bvlc/examples/mnist/lenet.prototxt"),
                                      os.path.join(_fixtures(shared_dir), "lenet_iter_20.caffemodel"))
    cv_net.setInput(x)
    np.testing.assert_allclose(cv_net.forward("ip2"), ref["ip2"], rtol=1e-4, atol=1e-4)


def test_opencv_reads_our_lenet_caffemodel(shared_dir, tmp_path):
    cv2 = _cv2()
    x, ref = _reference(shared_dir)
    net = framework.Net(_lenet_param(shared_dir, 16),
                        weights=os.path.join(_fixtures(shared_dir), "lenet_iter_20_v1.caffemodel"))
    ours = net.forward(data=x, blobs=["ip2"])
    path = str(tmp_path / "lenet_ours.caffemodel")
    net.save(path)
    cv_net = cv2.dnn.readNetFromCaffe(_model(shared_dir, "bvlc/examples/mnist/lenet.prototxt"), path)
    cv_net.setInput(x)
    cv_ip2, cv_prob = cv_net.forward(["ip2", "prob"])
    assert _relative_error(cv_ip2, ours["ip2"]) < 1e-4
    assert _relative_error(cv_prob, ours["prob"]) < 1e-4
    np.testing.assert_allclose(cv_ip2, ref["ip2"], rtol=1e-4, atol=1e-4)


def _randomize_batchnorm_scale_factors(net, seed):
    """Scale factors s != 1 (M and V scaled alike, so M/s and V/s keep randomize_params' values)."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            s = np.float32(rng.uniform(0.5, 50.0))
            layer.blobs[0].data[...] *= s
            layer.blobs[1].data[...] *= s
            layer.blobs[2].data[...] = s


def test_opencv_reads_our_resnet50_caffemodel(shared_dir, tmp_path):
    cv2 = _cv2()
    prototxt = _model(shared_dir, "resnet/ResNet-50-deploy.prototxt")
    net = framework.Net(prototxt, framework.TEST)
    randomize_params(net, seed=5)
    _randomize_batchnorm_scale_factors(net, seed=6)
    path = str(tmp_path / "resnet50.caffemodel")
    net.save(path)
    x = np.random.default_rng(7).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ours = net.forward(data=x, blobs=["fc1000"])
    cv_net = cv2.dnn.readNetFromCaffe(prototxt, path)
    cv_net.setInput(x)
    cv_fc, cv_prob = cv_net.forward(["fc1000", "prob"])
    assert cv_fc.shape == (2, 1000)
    assert np.ptp(ours["fc1000"]) > 1  # a non-degenerate output, so the comparison means something
    assert _relative_error(cv_fc, ours["fc1000"]) < 1e-4
    assert _relative_error(cv_prob, ours["prob"]) < 1e-4


_BATCHNORM_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn" batch_norm_param { eps: 0.01 } }
layer { name: "scale" type: "Scale" bottom: "bn" top: "scale" scale_param { bias_term: true } }
layer { name: "bn_untrained" type: "BatchNorm" bottom: "scale" top: "scale" }
"""


@pytest.mark.parametrize("scale_factor", [3.0, 0.0], ids=["s=3", "s=0"])
def test_opencv_applies_our_batchnorm_statistics_as_caffe(tmp_path, scale_factor):
    """Our BatchNorm blobs (M, V, s) mean the same to OpenCV, including Caffe's s == 0 guard."""
    cv2 = _cv2()
    param = caffe_io.parse_prototxt_text(_BATCHNORM_NET, caffe_pb2.NetParameter)
    param.state.phase = caffe_pb2.TEST
    net = framework.Net(param)
    randomize_params(net, seed=3)
    rng = np.random.default_rng(4)
    bn = net.params["bn"]
    bn[0].data[...] = scale_factor * rng.normal(0, 1, 4)
    bn[1].data[...] = scale_factor * rng.uniform(0.5, 2, 4)
    bn[2].data[...] = scale_factor
    net.params["bn_untrained"][0].data[...] = 5.0  # ignored: its scale factor stays 0
    prototxt, weights = tmp_path / "bn.prototxt", tmp_path / "bn.caffemodel"
    caffe_io.write_prototxt(prototxt, param)
    net.save(weights)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    ours = net.forward(data=x)["scale"]
    cv_net = cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))
    cv_net.setInput(x)
    assert _relative_error(cv_net.forward("bn_untrained"), ours) < 1e-5  # OpenCV names outputs by layer


# -- large files -------------------------------------------------------------------------

_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import framework
    def status_mb(field):  # per-process (not inherited like ru_maxrss across fork+exec)
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith(field + ":"))
        return int(line.split()[1]) / 1024
    net = framework.Net(sys.argv[1], framework.TEST)
    before = status_mb("VmRSS")
    start = time.perf_counter()
    net.copy_from(sys.argv[2])
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    checksum = float(sum(float(b.data.astype("float64").sum()) for blobs in net.params.values() for b in blobs))
    print(json.dumps({"seconds": seconds, "before_mb": before, "peak_mb": peak, "checksum": checksum}))
""")


def test_resnet152_caffemodel_round_trip(shared_dir, tmp_path):
    """~230 MB of weights: no protobuf size limit, at most ~2 transient copies (load time printed)."""
    import json

    prototxt = _model(shared_dir, "resnet/ResNet-152-deploy.prototxt")
    net = framework.Net(prototxt, framework.TEST)
    randomize_params(net, seed=11)
    path = tmp_path / "resnet152.caffemodel"
    net.save(path)
    weight_mb = sum(b.data.nbytes for blobs in net.params.values() for b in blobs) / 2**20
    assert os.path.getsize(path) / 2**20 > 200 and weight_mb > 200
    expected = float(sum(float(b.data.astype(np.float64).sum()) for blobs in net.params.values() for b in blobs))
    some = {name: [b.data.copy() for b in net.params[name]]
            for name in ("conv1", "res3b2_branch2b", "bn5c_branch2c", "fc1000")}
    del net

    # A fresh process, so its peak RSS is the load's own (ours holds the saving net).
    result = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, prototxt, str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    growth = report["peak_mb"] - report["before_mb"]
    print(f"\nResNet-152 .caffemodel: {os.path.getsize(path) / 2**20:.0f} MB, load {report['seconds']:.2f} s, "
          f"peak RSS +{growth:.0f} MB for {weight_mb:.0f} MB of weights")
    # The load time is printed above, not asserted: speed belongs to benchmarks, not tests.
    assert growth < 3 * weight_mb, f"loading held {growth / weight_mb:.1f}x the weights at its peak"
    assert report["checksum"] == pytest.approx(expected, rel=1e-9)

    # And in this process through the pycaffe constructor, values exactly as saved.
    loaded = framework.Net(prototxt, str(path), framework.TEST)
    for name, arrays in some.items():
        assert len(loaded.params[name]) == len(arrays)
        for blob, array in zip(loaded.params[name], arrays):
            np.testing.assert_array_equal(blob.data, array)
