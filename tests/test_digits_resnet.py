"""models/digits_resnet: the small BatchNorm ResNet for the bundled digits.

(a) quick: the three prototxts build (TRAIN, TEST, deploy) and run forward and
    backward on a few generated digits; the deploy file mirrors the trained layers.
(b) a short training run on the bundled digits follows Caffe's BatchNorm rules:
    the statistics blobs hold exactly the moving sums of batch_norm_layer.cpp, and
    the TEST phase (global statistics) scores close to the training batches.
(c) heavy: the full ``tools/train.py`` run reaches 0.98 on the 1,000 held-out
    digits, and a batch-statistics evaluation of the same weights agrees within a point.
"""
import contextlib
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import framework
from framework.db import open_db
from framework.net import read_net_param
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "models", "digits_resnet")
TRAIN_TEST = os.path.join(MODEL_DIR, "digits_resnet_train_test.prototxt")
SOLVER = os.path.join(MODEL_DIR, "digits_resnet_solver.prototxt")
DEPLOY = os.path.join(MODEL_DIR, "digits_resnet_deploy.prototxt")
MNIST = os.path.join(ROOT, "data", "mnist")
BLOCKS = ("res2a", "res3a", "res4a")
PROJECTED = ("res3a", "res4a")
CAFFE_DEFAULT_LAMBDA = 0.999  # caffe.proto: BatchNormParameter.moving_average_fraction


def _one_blas_thread():
    """Limit BLAS to one thread when threadpoolctl is installed (optional).

    This net's matrices are small: one thread is as fast, while two OpenBLAS threads on a
    busy 2-core machine made the short training below 10x slower (159 s instead of 15 s).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# -- helpers -------------------------------------------------------------------------------

def _convert_mnist():
    spec = importlib.util.spec_from_file_location("_digits_convert_mnist",
                                                  os.path.join(ROOT, "tools", "convert_mnist.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_dbs(tmp_path_factory):
    """LMDBs of the bundled digits: {"train": 4,000 digits, "test": 1,000 digits}."""
    convert = _convert_mnist().convert_dataset
    out = tmp_path_factory.mktemp("digits")
    paths = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        paths[split] = str(out / f"mnist_{split}_lmdb")
        convert(os.path.join(MNIST, f"{prefix}-images-idx3-ubyte.gz"),
                os.path.join(MNIST, f"{prefix}-labels-idx1-ubyte.gz"), paths[split], log=lambda *a: None)
    return paths


def _generated_digits(count):
    """``count`` crude 28x28 digits drawn in NumPy: a bar for odd labels, a ring for even ones."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:28, :28]
    images, labels = [], []
    for i in range(count):
        cy, cx = 14 + rng.integers(-2, 3), 14 + rng.integers(-2, 3)
        if i % 2:
            ink = (np.abs(xx - cx) <= 1) & (np.abs(yy - cy) <= 9)
        else:
            r = np.hypot(yy - cy, (xx - cx) * 1.4)
            ink = (r >= 6) & (r <= 9)
        images.append(np.where(ink, 255, 0).astype(np.uint8))
        labels.append(i % 10)
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    """An LMDB of 8 generated digits (Caffe Datums, 1x28x28 uint8)."""
    path = str(tmp_path_factory.mktemp("tiny") / "tiny_lmdb")
    images, labels = _generated_digits(8)
    datum = caffe_pb2.Datum(channels=1, height=28, width=28)
    with open_db(path, "lmdb", mode="new") as db:
        txn = db.transaction()
        for i, (image, label) in enumerate(zip(images, labels)):
            datum.data = image.tobytes()
            datum.label = int(label)
            txn.put(b"%08d" % i, datum.SerializeToString())
        txn.commit()
    return path


def _net_param(phase, train_source, test_source, batch_size=None, global_stats=None):
    """The train_test NetParameter with its Data sources replaced (and optionally batch sizes,
    and use_global_stats forced on every BatchNorm layer)."""
    param = read_net_param(TRAIN_TEST)
    param.state.phase = phase
    for layer in param.layer:
        if layer.type == "Data":
            is_train = layer.include[0].phase == caffe_pb2.TRAIN
            layer.data_param.source = train_source if is_train else test_source
            if batch_size is not None:
                layer.data_param.batch_size = batch_size
        if layer.type == "BatchNorm" and global_stats is not None:
            layer.batch_norm_param.use_global_stats = global_stats
    return param


def _bn_layers(net):
    return [layer for layer in net.layers if layer.layer_param.type == "BatchNorm"]


def _model_lambda():
    """moving_average_fraction of the model's BatchNorm layers (all the same)."""
    values = {layer.batch_norm_param.moving_average_fraction
              for layer in read_net_param(TRAIN_TEST).layer if layer.type == "BatchNorm"}
    assert len(values) == 1
    return values.pop()


def _crop_size():
    sizes = {layer.transform_param.crop_size for layer in read_net_param(TRAIN_TEST).layer
             if layer.type == "Data"}
    assert len(sizes) == 1
    return sizes.pop() or 28


def _score(net, batches):
    """Mean of the TEST net's accuracy output over ``batches`` forward passes."""
    return float(np.mean([float(net.forward()["accuracy"]) for _ in range(batches)]))


# -- (a) the prototxts build and run -----------------------------------------------------

def test_train_net_forward_backward_on_generated_digits(tiny_db):
    framework.set_random_seed(3)
    net = framework.Net(_net_param(caffe_pb2.TRAIN, tiny_db, tiny_db, batch_size=4))
    size = _crop_size()
    assert net.blobs["data"].shape == (4, 1, size, size)
    assert net.blobs["pool5"].shape == (4, 64, 1, 1)
    assert net.blobs["fc10"].shape == (4, 10)
    assert "accuracy" not in net.blobs
    # Caffe's ResNet naming: conv / bn / scale per convolution, Eltwise SUM per block.
    for block in BLOCKS:
        assert block in net.layer_names and block + "_relu" in net.layer_names
        assert net.layers[net.layer_names.index(block)].layer_param.type == "Eltwise"
        for branch in ("branch2a", "branch2b"):
            for name in (f"{block}_{branch}", f"bn{block[3:]}_{branch}", f"scale{block[3:]}_{branch}"):
                assert name in net.layer_names, name
    for block in PROJECTED:  # stride-2 projection shortcuts
        assert net.params[block + "_branch1"][0].shape[2:] == (1, 1)
    assert net.bottom_names["res2a"][0].startswith("conv1")  # identity shortcut in stage 2
    bn = _bn_layers(net)
    assert len(bn) == 1 + 2 * len(BLOCKS) + len(PROJECTED) and not any(layer.use_global_stats for layer in bn)
    lr_of = {id(blob): lr for blob, lr in zip(net.learnable_params, net.params_lr)}
    for layer in bn:  # statistics: batch_norm_layer.cpp gives them lr_mult 0
        mean, var, factor = layer.blobs
        assert factor.shape == (1,) and mean.shape == var.shape
        assert all(lr_of.get(id(blob), 0.0) == 0.0 for blob in layer.blobs)

    loss = net.forward_backward()
    assert np.isfinite(loss) and loss > 0.5  # untrained: near log(10)
    for name, blobs in net.params.items():
        if name.startswith("bn"):
            continue
        for blob in blobs:
            assert np.abs(blob.diff).max() > 0, f"{name}: zero gradient"
    for layer in bn:  # one batch seen: s = 1 and the sums are that batch's statistics
        assert layer.blobs[2].data[0] == 1.0
        assert np.all(layer.blobs[1].data > 0)


def test_default_moving_average_fraction_gives_caffe_scale_factor(tiny_db):
    """With Caffe's default λ = 0.999, N forwards in TRAIN leave s_N = Σ_{k<N} λ^k."""
    param = _net_param(caffe_pb2.TRAIN, tiny_db, tiny_db, batch_size=4)
    for layer in param.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.ClearField("moving_average_fraction")
    net = framework.Net(param)
    for _ in range(7):
        net.forward()
    lam = CAFFE_DEFAULT_LAMBDA
    expected = (1 - lam ** 7) / (1 - lam)
    for layer in _bn_layers(net):
        np.testing.assert_allclose(layer.blobs[2].data[0], expected, rtol=1e-6)


def test_test_and_deploy_nets_agree(tiny_db, tmp_path):
    framework.set_random_seed(4)
    train = framework.Net(_net_param(caffe_pb2.TRAIN, tiny_db, tiny_db, batch_size=8))
    for _ in range(3):  # fill the statistics blobs
        train.forward()
    weights = str(tmp_path / "w.caffemodel")
    train.save(weights)

    test = framework.Net(_net_param(caffe_pb2.TEST, tiny_db, tiny_db, batch_size=8), weights=weights)
    assert all(layer.use_global_stats for layer in _bn_layers(test))
    out = test.forward()
    assert 0.0 <= float(out["accuracy"]) <= 1.0 and np.isfinite(float(out["loss"]))

    deploy = framework.Net(DEPLOY, weights, framework.TEST)
    size = _crop_size()
    assert deploy.inputs == ["data"] and deploy.blobs["data"].shape == (1, 1, size, size)
    assert list(deploy.params) == list(test.params)
    for name in test.params:
        for a, b in zip(deploy.params[name], test.params[name]):
            assert a.shape == b.shape
    assert all(layer.use_global_stats for layer in _bn_layers(deploy))
    probs = deploy.forward(data=test.blobs["data"].data.copy())["prob"]
    assert probs.shape == (8, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(deploy.blobs["fc10"].data, test.blobs["fc10"].data, rtol=1e-4, atol=1e-5)


# -- (b) a short training run keeps Caffe's BatchNorm statistics ----------------------------

def _conv1_stats(data, weights, pad):
    """Per-channel mean and biased variance of conv1's output (the input of bn_conv1)."""
    n, _, h, w = data.shape
    k = weights.shape[-1]
    xp = np.pad(data[:, 0].astype(np.float64), ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))  # n, h, w, k, k
    out = np.einsum("nhwij,cij->nchw", windows, weights[:, 0].astype(np.float64))
    return out.mean(axis=(0, 2, 3)), out.var(axis=(0, 2, 3)), n * h * w


def test_short_training_keeps_moving_averages_and_matches_test_phase(digits_dbs, tmp_path):
    """250 solver iterations (batch 32): bn_conv1's sums equal Caffe's moving sums of conv1's
    batch statistics, recomputed here in float64; the TEST phase then scores like the training
    batches and like a batch-statistics evaluation of the same held-out digits."""
    iterations, batch = 250, 32
    solver_param = caffe_pb2.SolverParameter()
    with open(SOLVER) as f:
        text_format.Merge(f.read(), solver_param)
    solver_param.ClearField("net")
    solver_param.net_param.CopyFrom(_net_param(caffe_pb2.TRAIN, digits_dbs["train"], digits_dbs["test"]))
    for layer in solver_param.net_param.layer:
        if layer.type == "Data" and layer.include[0].phase == caffe_pb2.TRAIN:
            layer.data_param.batch_size = batch
    solver_param.net_param.ClearField("state")
    # The model's schedule compressed to `iterations`: the statistics (a moving average over
    # ~1/(1-λ) iterations) can only match the final weights once the learning rate has dropped.
    solver_param.max_iter = iterations
    del solver_param.stepvalue[:]
    solver_param.stepvalue.extend([3 * iterations // 10, iterations // 2])
    solver_param.test_interval = 10 * iterations  # no periodic test: we test by hand
    solver_param.test_initialization = False
    solver_param.snapshot = 0
    solver_param.snapshot_prefix = str(tmp_path / "short")
    solver_param.display = 0
    with _one_blas_thread():
        _short_training(solver_param, digits_dbs)


def _short_training(solver_param, digits_dbs):
    """The body of the short-training test (run under :func:`_one_blas_thread`)."""
    iterations = solver_param.max_iter
    batch = next(layer.data_param.batch_size for layer in solver_param.net_param.layer
                 if layer.type == "Data" and layer.include[0].phase == caffe_pb2.TRAIN)
    solver = framework.SGDSolver(solver_param)
    net = solver.net
    conv1 = next(layer for layer in read_net_param(TRAIN_TEST).layer if layer.name == "conv1")
    pad = int(conv1.convolution_param.pad[0])

    lam = _model_lambda()
    mean_sum = var_sum = 0.0
    correct = seen = 0
    for it in range(iterations):
        w_before = net.params["conv1"][0].data.copy()
        solver.step(1)
        mu, var, m = _conv1_stats(net.blobs["data"].data, w_before, pad)
        mean_sum = lam * mean_sum + mu
        var_sum = lam * var_sum + var * m / (m - 1)
        if it >= iterations - 1280 // batch:  # accuracy of the last training batches (batch statistics)
            correct += int((net.blobs["fc10"].data.argmax(axis=1) == net.blobs["label"].data).sum())
            seen += net.blobs["label"].data.shape[0]

    # batch_norm_layer.cpp: s ← λs + 1, M ← λM + μ, V ← λV + m/(m−1)·σ², from zero.
    bn_mean, bn_var, bn_factor = net.params["bn_conv1"]
    np.testing.assert_allclose(bn_factor.data[0], (1 - lam ** iterations) / (1 - lam), rtol=1e-5)
    for layer in _bn_layers(net):
        assert layer.blobs[2].data[0] == bn_factor.data[0]
    # Float32 sums agree to ~1e-6; rtol 2e-5 still sees the m/(m-1) factor (1 + 5.4e-5 here).
    np.testing.assert_allclose(bn_mean.data, mean_sum, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(bn_var.data, var_sum, rtol=2e-5, atol=1e-6)

    # TEST phase: the test net shares the trained layers, statistics included (solver.cpp Test).
    test_net = solver.test_nets[0]
    test_net.share_trained_layers_with(net)
    assert all(layer.use_global_stats for layer in _bn_layers(test_net))
    np.testing.assert_array_equal(test_net.params["bn_conv1"][2].data, bn_factor.data)
    train_acc = correct / seen
    test_acc = _score(test_net, 5)
    batch_net = framework.Net(_net_param(caffe_pb2.TEST, digits_dbs["train"], digits_dbs["test"],
                                         global_stats=False))
    batch_net.share_trained_layers_with(net)
    batch_acc = _score(batch_net, 5)  # the same held-out digits, normalised by batch statistics
    print(f"training batches {train_acc:.3f}, TEST phase {test_acc:.3f}, batch statistics {batch_acc:.3f}")
    assert train_acc > 0.85, train_acc
    assert abs(test_acc - train_acc) < 0.05, (test_acc, train_acc)
    assert abs(test_acc - batch_acc) < 0.03, (test_acc, batch_acc)

    # The global statistics do the work: zeroed sums (s = 0 gives y = x/√eps) break the net.
    for layer in _bn_layers(test_net):
        for blob in layer.blobs:
            blob.data[...] = 0
    assert _score(test_net, 2) < test_acc - 0.3


# -- (c) heavy: the full training run ----------------------------------------------------------

@pytest.mark.heavy
def test_full_training_reaches_98_percent(digits_dbs, tmp_path):
    """tools/train.py with the model's solver, from a project-like folder, as the README says."""
    work = tmp_path
    (work / "models" / "digits_resnet").mkdir(parents=True)
    (work / "examples_out").mkdir()
    for name in os.listdir(MODEL_DIR):
        with open(os.path.join(MODEL_DIR, name)) as src:
            (work / "models" / "digits_resnet" / name).write_text(src.read())
    os.symlink(digits_dbs["train"], work / "examples_out" / "mnist_train_lmdb")
    os.symlink(digits_dbs["test"], work / "examples_out" / "mnist_test_lmdb")
    # Small matrices: one BLAS thread is as fast, and on a busy 2-core machine OpenBLAS's
    # spinning threads turned this 2-minute run into 18 minutes; an explicit setting is kept.
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"),
                             "--solver", "models/digits_resnet/digits_resnet_solver.prototxt"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = re.findall(r"Test net output #\d+: accuracy = ([0-9.]+)", result.stderr)
    assert scores, result.stderr[-3000:]
    global_acc = float(scores[-1])
    assert global_acc >= 0.98

    solver_param = caffe_pb2.SolverParameter()
    text_format.Merge((work / "models" / "digits_resnet" / "digits_resnet_solver.prototxt").read_text(),
                      solver_param)
    weights = work / f"{solver_param.snapshot_prefix}_iter_{solver_param.max_iter}.caffemodel"
    assert weights.exists()
    nets = {}
    for forced in (None, False):
        nets[forced] = framework.Net(_net_param(caffe_pb2.TEST, digits_dbs["train"], digits_dbs["test"],
                                                global_stats=forced), weights=str(weights))
    assert all(layer.use_global_stats for layer in _bn_layers(nets[None]))
    assert not any(layer.use_global_stats for layer in _bn_layers(nets[False]))
    global_eval = _score(nets[None], 10)
    batch_eval = _score(nets[False], 10)
    assert global_eval == pytest.approx(global_acc, abs=1e-6)
    print(f"TEST phase (global statistics) {global_eval:.3f}, batch statistics {batch_eval:.3f}")
    assert abs(global_eval - batch_eval) <= 0.01, (global_eval, batch_eval)
