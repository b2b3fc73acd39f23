"""Every real Caffe training file in ../shared/caffe-models runs.

Each train_val / train_test net builds in TRAIN and TEST and runs (forward_backward in
TRAIN, forward in TEST), and each solver file loads with ``framework.get_solver`` and
trains a few iterations.  The data the files name (MNIST / CIFAR / ImageNet LMDBs,
siamese LevelDBs, HDF5 lists, image lists, mean files) is replaced by small generated
fixtures of the same shapes (tests/fixtures_gen.py); batch sizes are shrunk, and
ImageNet nets keep their real 256×256 images cropped to 227/224 so the fc layers keep
their real shapes.  Nets with WindowData (the R-CNN Pascal fine-tuning example) are
out of scope.
"""
import glob
import os

import numpy as np
import pytest

import framework
from fixtures_gen import DatumDB, FixtureFactory, HDF5Files, ImageList, MeanFile, data_layers, rewrite_data_layers
from framework import io as caffe_io
from framework.net import read_net_param
from proto import caffe_pb2

# -- what the files' data sources look like ------------------------------------------
MNIST = DatumDB(1, 28, 28, classes=10)
CIFAR = DatumDB(3, 32, 32, classes=10)
SIAMESE = DatumDB(2, 28, 28, classes=2, backend="leveldb")   # pair_data: two digits, sim in {0, 1}
IMAGENET = DatumDB(3, 256, 256, classes=1000)
IMAGENET_ENCODED = DatumDB(3, 256, 256, classes=1000, encoded=True)  # convert_imageset --encoded
HDF5_CLASSIFICATION = HDF5Files((("data", (4,), 0), ("label", (), 2)))

SOURCE_SPECS = {
    "examples/mnist/mnist_train_lmdb": MNIST,
    "examples/mnist/mnist_test_lmdb": MNIST,
    "mnist/mnist_train_lmdb": MNIST,      # the 01-learning-lenet notebook's paths
    "mnist/mnist_test_lmdb": MNIST,
    "examples/cifar10/cifar10_train_lmdb": CIFAR,
    "examples/cifar10/cifar10_test_lmdb": CIFAR,
    "examples/cifar10/mean.binaryproto": MeanFile(3, 32, 32),
    "examples/siamese/mnist_siamese_train_leveldb": SIAMESE,
    "examples/siamese/mnist_siamese_test_leveldb": SIAMESE,
    "examples/imagenet/ilsvrc12_train_lmdb": IMAGENET,
    "examples/imagenet/ilsvrc12_val_lmdb": IMAGENET_ENCODED,
    "data/ilsvrc12/imagenet_mean.binaryproto": MeanFile(3, 256, 256),
    # ImageData resizes to new_height × new_width (256): store other sizes to exercise it
    "data/flickr_style/train.txt": ImageList(240, 320, classes=20),
    "data/flickr_style/test.txt": ImageList(256, 256, classes=20),
    "examples/_temp/file_list.txt": ImageList(300, 260, classes=1000),
    "examples/hdf5_classification/data/train.txt": HDF5_CLASSIFICATION,
    "examples/hdf5_classification/data/test.txt": HDF5_CLASSIFICATION,
}

SMALL_BATCH = 4
IMAGENET_BATCH = 2

# Files that need WindowData (R-CNN detection fine-tuning): not covered.
WINDOW_DATA_FILES = {
    "bvlc/examples/finetune_pascal_detection/pascal_finetune_trainval_test.prototxt",
    "bvlc/examples/finetune_pascal_detection/pascal_finetune_solver.prototxt",
}

LOSS = ("loss",)
ACC_LOSS = ("accuracy", "loss")
GOOGLENET_TRAIN = ("loss1/loss1", "loss2/loss2", "loss3/loss3")
GOOGLENET_TEST = tuple(f"loss{k}/{name}" for k in (1, 2, 3) for name in (f"loss{k}", "top-1", "top-5"))
AUTOENCODER = ("cross_entropy_loss", "l2_error")


class NetCase:
    """One train/test prototxt: its outputs per phase, data blob and shape, batch, TEST stages."""

    def __init__(self, path, train_outputs, test_outputs, data_blob, item_shape, batch=SMALL_BATCH,
                 test_stages=((),), heavy=False):
        self.path = path
        self.outputs = {framework.TRAIN: train_outputs, framework.TEST: test_outputs}
        self.data_blob = data_blob
        self.item_shape = item_shape
        self.batch = batch
        self.test_stages = test_stages
        self.heavy = heavy


NET_CASES = [
    NetCase("bvlc/examples/mnist/lenet_train_test.prototxt", LOSS, ACC_LOSS, "data", (1, 28, 28)),
    NetCase("bvlc/examples/mnist/mnist_autoencoder.prototxt", AUTOENCODER, AUTOENCODER, "data", (1, 28, 28),
            test_stages=(("test-on-train",), ("test-on-test",))),
    NetCase("bvlc/examples/siamese/mnist_siamese_train_test.prototxt", LOSS, LOSS, "pair_data", (2, 28, 28)),
    NetCase("bvlc/examples/cifar10/cifar10_quick_train_test.prototxt", LOSS, ACC_LOSS, "data", (3, 32, 32)),
    NetCase("bvlc/examples/cifar10/cifar10_full_train_test.prototxt", LOSS, ACC_LOSS, "data", (3, 32, 32)),
    NetCase("bvlc/examples/cifar10/cifar10_full_sigmoid_train_test.prototxt", LOSS, ACC_LOSS, "data", (3, 32, 32)),
    NetCase("bvlc/examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt", LOSS, ACC_LOSS, "data",
            (3, 32, 32)),
    NetCase("bvlc/examples/hdf5_classification/train_val.prototxt", LOSS, ACC_LOSS, "data", (4,)),
    NetCase("bvlc/examples/hdf5_classification/nonlinear_train_val.prototxt", LOSS, ACC_LOSS, "data", (4,)),
    NetCase("bvlc/examples/hdf5_classification/nonlinear_auto_train.prototxt", ACC_LOSS, ACC_LOSS, "data", (4,)),
    NetCase("bvlc/examples/hdf5_classification/nonlinear_auto_test.prototxt", ACC_LOSS, ACC_LOSS, "data", (4,)),
    NetCase("bvlc/models/bvlc_reference_caffenet/train_val.prototxt", LOSS, ACC_LOSS, "data", (3, 227, 227),
            batch=IMAGENET_BATCH),
    NetCase("bvlc/models/bvlc_alexnet/train_val.prototxt", LOSS, ACC_LOSS, "data", (3, 227, 227),
            batch=IMAGENET_BATCH),
    NetCase("bvlc/models/finetune_flickr_style/train_val.prototxt", LOSS, ACC_LOSS, "data", (3, 227, 227),
            batch=IMAGENET_BATCH),
    NetCase("bvlc/examples/feature_extraction/imagenet_val.prototxt", ACC_LOSS, ACC_LOSS, "data", (3, 227, 227),
            batch=IMAGENET_BATCH),
    NetCase("bvlc/models/bvlc_googlenet/train_val.prototxt", GOOGLENET_TRAIN, GOOGLENET_TEST, "data",
            (3, 224, 224), batch=1),
]


class SolverCase:
    """One solver file: its solver type and how to shrink it (``large``: no snapshot files)."""

    def __init__(self, path, solver_type, batch=SMALL_BATCH, large=False, heavy=False):
        self.path = path
        self.solver_type = solver_type
        self.batch = batch
        self.large = large
        self.heavy = heavy


SOLVER_CASES = [
    SolverCase("bvlc/examples/mnist/lenet_solver.prototxt", "SGD"),
    SolverCase("bvlc/examples/mnist/lenet_multistep_solver.prototxt", "SGD"),
    SolverCase("bvlc/examples/mnist/lenet_solver_adam.prototxt", "Adam"),
    SolverCase("bvlc/examples/mnist/lenet_solver_rmsprop.prototxt", "RMSProp"),
    SolverCase("bvlc/examples/mnist/lenet_adadelta_solver.prototxt", "AdaDelta"),
    SolverCase("bvlc/examples/mnist/lenet_consolidated_solver.prototxt", "SGD"),   # V1 net_param inside
    SolverCase("bvlc/examples/mnist/lenet_auto_solver.prototxt", "SGD"),           # train_net / test_net
    SolverCase("bvlc/examples/mnist/mnist_autoencoder_solver.prototxt", "SGD"),
    SolverCase("bvlc/examples/mnist/mnist_autoencoder_solver_adadelta.prototxt", "AdaDelta"),
    SolverCase("bvlc/examples/mnist/mnist_autoencoder_solver_adagrad.prototxt", "AdaGrad"),
    SolverCase("bvlc/examples/mnist/mnist_autoencoder_solver_nesterov.prototxt", "Nesterov"),
    SolverCase("bvlc/examples/siamese/mnist_siamese_solver.prototxt", "SGD"),
    SolverCase("bvlc/examples/cifar10/cifar10_quick_solver.prototxt", "SGD"),
    SolverCase("bvlc/examples/cifar10/cifar10_quick_solver_lr1.prototxt", "SGD"),
    SolverCase("bvlc/examples/cifar10/cifar10_full_solver.prototxt", "SGD"),
    SolverCase("bvlc/examples/cifar10/cifar10_full_solver_lr1.prototxt", "SGD"),
    SolverCase("bvlc/examples/cifar10/cifar10_full_solver_lr2.prototxt", "SGD"),
    SolverCase("bvlc/examples/cifar10/cifar10_full_sigmoid_solver.prototxt", "SGD"),
    SolverCase("bvlc/examples/cifar10/cifar10_full_sigmoid_solver_bn.prototxt", "SGD"),
    SolverCase("bvlc/models/bvlc_reference_caffenet/solver.prototxt", "SGD", batch=1, large=True),
    SolverCase("bvlc/models/bvlc_alexnet/solver.prototxt", "SGD", batch=1, large=True),
    SolverCase("bvlc/models/finetune_flickr_style/solver.prototxt", "SGD", batch=1, large=True),
    SolverCase("bvlc/models/bvlc_googlenet/solver.prototxt", "SGD", batch=1, large=True),  # ImageNet scale, kept quick
    SolverCase("bvlc/models/bvlc_googlenet/quick_solver.prototxt", "SGD", batch=1, large=True),
]

# The 01-learning-lenet notebook writes the nets lenet_auto_solver names (they are not in
# Caffe's tree); this is what its `lenet(lmdb, batch_size)` NetSpec function produces.
LENET_AUTO_NET = """
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.00392156862745 }}
  data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 20 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 50 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "fc1" type: "InnerProduct" bottom: "pool2" top: "fc1"
  inner_product_param {{ num_output: 500 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }}
layer {{ name: "score" type: "InnerProduct" bottom: "fc1" top: "score"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }}
"""
NOTEBOOK_NETS = {
    "mnist/lenet_auto_train.prototxt": LENET_AUTO_NET.format(source="mnist/mnist_train_lmdb", batch=64),
    "mnist/lenet_auto_test.prototxt": LENET_AUTO_NET.format(source="mnist/mnist_test_lmdb", batch=100),
}

SOLVER_TYPES = {"SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"}
MAX_ITER = 3
LARGE_MAX_ITER = 2


# -- helpers -------------------------------------------------------------------------
def models_dir(shared_dir):
    return os.path.join(shared_dir, "caffe-models")


def case_id(case):
    return case.path.split("/", 2)[-1]


def cases_with_marks(cases, *phases):
    params = []
    for case in cases:
        marks = [pytest.mark.heavy] if case.heavy else []
        if phases:
            for phase in phases:
                name = "TRAIN" if phase == framework.TRAIN else "TEST"
                params.append(pytest.param(case, phase, marks=marks, id=f"{case_id(case)}-{name}"))
        else:
            params.append(pytest.param(case, marks=marks, id=case_id(case)))
    return params


def write_rewritten_net(net_param, factory, batch, path):
    """Point ``net_param``'s data layers at fixtures, write it to ``path``; returns ``path``."""
    assert rewrite_data_layers(net_param, factory, batch) > 0, "a training net reads data"
    caffe_io.write_prototxt(path, net_param)
    return path


def loss_outputs(net):
    return {name: w for name, w in net.output_loss_weights.items() if w}


def check_outputs(net, values, expected, where, trained=False):
    """Output names as expected; accuracies in [0, 1]; losses finite and > 0.

    After training (``trained``) a loss may reach 0: a few SGD steps on five noise images
    can saturate a softmax (GoogLeNet's loss1 classifier gives prob 1.0, loss -0.0).
    """
    assert sorted(values) == sorted(expected), f"{where}: outputs {sorted(values)}"
    for name, value in values.items():
        value = np.asarray(value)
        assert value.size == 1 and np.isfinite(value).all(), f"{where}: {name} = {value}"
        if "accuracy" in name or "top-" in name:
            assert 0.0 <= float(value) <= 1.0, f"{where}: {name} = {value}"
        elif name in loss_outputs(net) and not trained:
            assert float(value) > 0.0, f"{where}: loss {name} = {value}"
        else:  # a loss top with weight 0 (the autoencoder's l2_error): still a loss value
            assert float(value) >= 0.0, f"{where}: {name} = {value}"


# -- the corpus is covered -----------------------------------------------------------
def _has_data_layer(path):
    param = caffe_io.read_net_param(path)
    return bool(data_layers(param)) or any(
        layer.type == "WindowData" for layer in param.layer)


def test_every_training_file_is_covered(shared_dir):
    root = models_dir(shared_dir)
    files = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.prototxt"),
                                                                 recursive=True))
    solvers = {f for f in files if "solver" in os.path.basename(f)}
    nets = {f for f in files if f not in solvers and _has_data_layer(os.path.join(root, f))}
    assert {c.path for c in SOLVER_CASES} == solvers - WINDOW_DATA_FILES
    assert {c.path for c in NET_CASES} == nets - WINDOW_DATA_FILES
    assert {c.solver_type for c in SOLVER_CASES} == SOLVER_TYPES
    assert len(nets) >= 16 and len(solvers) >= 24


# -- nets: both phases ---------------------------------------------------------------
@pytest.mark.parametrize("case,phase", cases_with_marks(NET_CASES, framework.TRAIN, framework.TEST))
def test_train_net_builds_and_runs(shared_dir, tmp_path, case, phase):
    framework.set_random_seed(0)
    factory = FixtureFactory(tmp_path / "data", SOURCE_SPECS)
    os.makedirs(factory.root)
    param = read_net_param(os.path.join(models_dir(shared_dir), case.path))
    net_path = write_rewritten_net(param, factory, case.batch, str(tmp_path / "net.prototxt"))
    stage_sets = ((),) if phase == framework.TRAIN else case.test_stages
    for stages in stage_sets:
        where = f"{case.path} phase {phase} stages {list(stages)}"
        net = framework.Net(net_path, phase, stages=list(stages))
        assert net.blobs[case.data_blob].shape == (case.batch,) + case.item_shape, where
        assert net.learnable_params, where
        if phase == framework.TRAIN:
            loss = net.forward_backward()
            values = {name: net.blobs[name].data for name in net.outputs}
            check_outputs(net, values, case.outputs[phase], where)
            assert np.isfinite(loss) and loss > 0, f"{where}: loss {loss}"
            weighted = sum(w * float(net.blobs[name].data.sum()) for name, w in loss_outputs(net).items())
            assert loss == pytest.approx(weighted, rel=1e-5), where
            diffs = [p.diff for p in net.learnable_params]
            assert all(np.isfinite(d).all() for d in diffs), f"{where}: non-finite gradient"
            assert sum(float(np.abs(d).sum()) for d in diffs) > 0, f"{where}: all gradients are zero"
        else:
            values = net.forward()
            check_outputs(net, values, case.outputs[phase], where)
        for layer in net.layers:  # stop the prefetch threads now rather than at garbage collection
            if hasattr(layer, "close"):
                layer.close()


# -- solvers -------------------------------------------------------------------------
def _resolve_net_file(bvlc, relpath):
    """A solver's net path is relative to Caffe's root (``examples/...``, ``models/...``), or to
    ``examples/`` for the notebook solvers.  Returns a NetParameter."""
    for candidate in (os.path.join(bvlc, relpath), os.path.join(bvlc, "examples", relpath)):
        if os.path.isfile(candidate):
            return read_net_param(candidate)
    if relpath in NOTEBOOK_NETS:
        return caffe_io.parse_prototxt_text(NOTEBOOK_NETS[relpath], caffe_pb2.NetParameter, relpath)
    raise AssertionError(f"the net file '{relpath}' named by the solver is not in the corpus")


def shrink_solver(case, shared_dir, tmp_path):
    """A copy of the solver file in ``tmp_path`` whose nets read fixtures, shrunk to a few iterations."""
    bvlc = os.path.join(models_dir(shared_dir), "bvlc")
    factory = FixtureFactory(tmp_path / "data", SOURCE_SPECS)
    os.makedirs(factory.root)
    param = caffe_io.read_solver_param(os.path.join(models_dir(shared_dir), case.path))
    for field in ("net", "train_net"):
        if param.HasField(field):
            net_param = _resolve_net_file(bvlc, getattr(param, field))
            setattr(param, field, write_rewritten_net(net_param, factory, case.batch,
                                                      str(tmp_path / f"{field}.prototxt")))
    for k, path in enumerate(param.test_net):
        net_param = _resolve_net_file(bvlc, path)
        param.test_net[k] = write_rewritten_net(net_param, factory, case.batch, str(tmp_path / f"test{k}.prototxt"))
    for net_param in ([param.net_param] if param.HasField("net_param") else []) + list(param.test_net_param):
        assert rewrite_data_layers(net_param, factory, case.batch) > 0
    max_iter = LARGE_MAX_ITER if case.large else MAX_ITER
    param.max_iter = max_iter
    param.test_interval = max_iter          # tests at iteration 0 (if test_initialization) and at the end
    param.test_iter[:] = [1] * len(param.test_iter)
    param.display = 1
    os.makedirs(tmp_path / "snapshots")
    param.snapshot_prefix = str(tmp_path / "snapshots" / "train")
    param.snapshot = 0 if case.large else max_iter
    if case.large:
        param.snapshot_after_train = False   # no 250 MB ImageNet snapshots in a unit test
    path = str(tmp_path / os.path.basename(case.path))
    caffe_io.write_prototxt(path, param)
    return path, max_iter


@pytest.mark.parametrize("case", cases_with_marks(SOLVER_CASES))
def test_solver_file_trains(shared_dir, tmp_path, case):
    framework.set_random_seed(0)
    path, max_iter = shrink_solver(case, shared_dir, tmp_path)
    solver = framework.get_solver(path)
    assert type(solver).type_name == case.solver_type
    assert isinstance(solver, framework.Solver)
    expected_tests = len(caffe_io.read_solver_param(path).test_iter)
    assert len(solver.test_nets) == expected_tests
    net = solver.net
    before = [p.data.copy() for p in net.learnable_params]
    solver.solve()
    assert solver.iter == max_iter
    assert np.isfinite(solver.smoothed_loss) and solver.smoothed_loss > 0, solver.smoothed_loss
    # training outputs after the last iteration: finite, losses > 0, accuracies in [0, 1]
    values = {name: net.blobs[name].data for name in net.outputs}
    check_outputs(net, values, list(values), f"{case.path} train net", trained=True)
    assert loss_outputs(net)
    # every weight with a learning rate moved, and biases too (not necessarily each: the
    # siamese net's last two biases are shared by both branches, so the contrastive loss,
    # which sees only the difference of the branches, gives them an exactly zero gradient)
    moved_biases = []
    for k, (blob, old, lr) in enumerate(zip(net.learnable_params, before, net.params_lr)):
        assert np.isfinite(blob.data).all(), f"learnable param {k} is not finite"
        if lr > 0 and blob.data.ndim >= 2:
            assert not np.array_equal(blob.data, old), f"learnable weight {k} (lr_mult {lr}) did not change"
        elif lr > 0:
            moved_biases.append(not np.array_equal(blob.data, old))
    assert not moved_biases or any(moved_biases), "no bias moved"
    # the test nets ran in solve() and share the trained weights
    for i, test_net in enumerate(solver.test_nets):
        assert solver.mean_scores[i], f"test net {i} was not run"
        results = solver.test(i)
        check_outputs(test_net, results, test_net.outputs, f"{case.path} test net {i}", trained=True)
        trained = {id(p) for p in net.learnable_params}
        assert any(id(p) in trained for p in test_net.learnable_params)
    snapshots = sorted(os.listdir(tmp_path / "snapshots"))
    if case.large:
        assert snapshots == []
    else:
        h5 = ".h5" if solver.param.snapshot_format == solver.param.HDF5 else ""
        assert snapshots == sorted([f"train_iter_{max_iter}.caffemodel{h5}", f"train_iter_{max_iter}.solverstate{h5}"])
