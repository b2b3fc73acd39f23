"""tools/make_resnet.py and the ResNet files of models/resnet.

The generated deploy files must reproduce the original Caffe release
(../shared/caffe-models/resnet/ResNet-{50,101,152}-deploy.prototxt) layer for layer;
the ResNet-50 train_val/solver pair must build in both phases and train one step.
"""
import importlib.util
import math
import os

import numpy as np
import pytest

import framework
from framework import io as caffe_io
from framework.db import open_db
from layers.data_transformer import array_to_datum
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models", "resnet")
DEPTHS = (50, 101, 152)


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "make_resnet", os.path.join(ROOT, "tools", "make_resnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_resnet = _load_tool()


def release_path(shared_dir, depth):
    return os.path.join(shared_dir, "caffe-models", "resnet", f"ResNet-{depth}-deploy.prototxt")


def layer_summary(layer):
    return (layer.name, layer.type, list(layer.bottom), list(layer.top))


# -- deploy files against the release ----------------------------------------------

@pytest.mark.parametrize("depth", DEPTHS)
def test_deploy_layers_match_release(shared_dir, depth):
    ours = caffe_io.read_net_param(os.path.join(MODELS, f"ResNet-{depth}-deploy.prototxt"))
    release = caffe_io.read_net_param(release_path(shared_dir, depth))
    assert ours.name == release.name == f"ResNet-{depth}"
    assert list(ours.input) == list(release.input) == ["data"]
    assert list(ours.input_dim) == list(release.input_dim) == [1, 3, 224, 224]
    assert len(ours.layer) == len(release.layer)
    for mine, theirs in zip(ours.layer, release.layer):
        assert layer_summary(mine) == layer_summary(theirs)
        for field in ("convolution_param", "batch_norm_param", "scale_param", "pooling_param",
                      "eltwise_param", "inner_product_param", "relu_param", "softmax_param"):
            assert mine.HasField(field) == theirs.HasField(field), (mine.name, field)
            assert getattr(mine, field) == getattr(theirs, field), (mine.name, field)
        assert mine == theirs, mine.name  # and nothing else differs
    assert ours == release


@pytest.mark.parametrize("depth", DEPTHS)
def test_deploy_text_is_byte_identical_to_release(shared_dir, depth):
    with open(release_path(shared_dir, depth)) as f:
        assert make_resnet.deploy_text(depth) == f.read()


def test_committed_files_are_the_generator_output(tmp_path, capsys):
    assert make_resnet.main(["--out", str(tmp_path)]) == 0
    written = sorted(os.listdir(tmp_path))
    assert written == sorted([f"ResNet-{d}-deploy.prototxt" for d in DEPTHS]
                             + ["ResNet-50-train_val.prototxt", "ResNet-50-solver.prototxt"])
    for name in written:
        with open(tmp_path / name) as new, open(os.path.join(MODELS, name)) as committed:
            assert new.read() == committed.read(), name
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("depth,blocks", [(50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)),
                                          (152, (3, 8, 36, 3))])
def test_architecture_counts_follow_the_paper(depth, blocks):
    param = caffe_io.read_net_param(os.path.join(MODELS, f"ResNet-{depth}-deploy.prototxt"))
    types = [layer.type for layer in param.layer]
    convs = [layer for layer in param.layer if layer.type == "Convolution"]
    projections = [c for c in convs if c.name.endswith("_branch1")]
    # "depth" counts the weighted layers on the main path: convs without the projections + fc.
    assert len(convs) - len(projections) + types.count("InnerProduct") == depth
    assert len(projections) == 4
    assert types.count("Eltwise") == sum(blocks)
    assert types.count("BatchNorm") == types.count("Scale") == len(convs)
    assert all(layer.batch_norm_param.use_global_stats
               for layer in param.layer if layer.type == "BatchNorm")
    strided = sorted(c.name for c in convs if c.convolution_param.stride[0] == 2)
    assert strided == sorted(["conv1"] + [f"res{s}a_branch{b}" for s in (3, 4, 5)
                                          for b in ("1", "2a")])
    # output widths of the last conv of each stage: 256, 512, 1024, 2048
    for stage, width in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        last = [c for c in convs if c.name.startswith(f"res{stage}")][-1]
        assert last.name.endswith("_branch2c") and last.convolution_param.num_output == width


def test_block_names():
    assert make_resnet.block_names(50, 3, 4) == ["3a", "3b", "3c", "3d"]
    assert make_resnet.block_names(101, 2, 3) == ["2a", "2b", "2c"]
    assert make_resnet.block_names(101, 4, 23)[-1] == "4b22"
    assert make_resnet.block_names(152, 3, 8) == ["3a"] + [f"3b{i}" for i in range(1, 8)]
    assert make_resnet.block_names(152, 5, 3) == ["5a", "5b", "5c"]
    with pytest.raises(ValueError, match="depth must be one of"):
        make_resnet.resnet_layers(34)


# -- train_val and solver ------------------------------------------------------------

def read_train_val():
    return caffe_io.read_net_param(os.path.join(MODELS, "ResNet-50-train_val.prototxt"))


def test_train_val_definition():
    param = read_train_val()
    data = [layer for layer in param.layer if layer.type == "Data"]
    assert [layer.include[0].phase for layer in data] == [caffe_pb2.TRAIN, caffe_pb2.TEST]
    for layer, mirror in zip(data, (True, False)):
        t = layer.transform_param
        assert (t.crop_size, t.mirror, list(t.mean_value)) == (224, mirror, [104, 117, 123])
        assert layer.data_param.backend == caffe_pb2.DataParameter.LMDB
        assert list(layer.top) == ["data", "label"]
    for layer in param.layer:
        if layer.type == "BatchNorm":
            assert not layer.batch_norm_param.HasField("use_global_stats"), layer.name
        if layer.type == "Convolution":
            assert layer.convolution_param.weight_filler.type == "msra", layer.name
    by_name = {layer.name: layer for layer in param.layer}
    assert by_name["loss"].type == "SoftmaxWithLoss"
    assert list(by_name["loss"].bottom) == ["fc1000", "label"]
    assert not by_name["loss"].include
    for name, k in (("accuracy", 1), ("accuracy_top5", 5)):
        assert by_name[name].type == "Accuracy"
        assert by_name[name].accuracy_param.top_k == k
        assert [r.phase for r in by_name[name].include] == [caffe_pb2.TEST]


def test_train_val_layers_carry_over_to_deploy():
    """Same names, wiring and shapes as the deploy file, so trained weights load into it."""
    deploy = caffe_io.read_net_param(os.path.join(MODELS, "ResNet-50-deploy.prototxt"))
    train = {layer.name: layer for layer in read_train_val().layer}
    for layer in deploy.layer:
        if layer.name == "prob":
            continue
        other = caffe_pb2.LayerParameter()
        other.CopyFrom(train[layer.name])
        # the only differences allowed: fillers and use_global_stats
        other.convolution_param.ClearField("weight_filler")
        other.convolution_param.ClearField("bias_filler")
        other.inner_product_param.ClearField("weight_filler")
        other.inner_product_param.ClearField("bias_filler")
        mine = caffe_pb2.LayerParameter()
        mine.CopyFrom(layer)
        mine.batch_norm_param.ClearField("use_global_stats")
        for m in (mine, other):
            for field in ("convolution_param", "inner_product_param", "batch_norm_param"):
                if not getattr(m, field).ListFields():
                    m.ClearField(field)
        assert mine == other, layer.name


def test_solver_definition():
    p = caffe_io.read_solver_param(os.path.join(MODELS, "ResNet-50-solver.prototxt"))
    assert p.net == "models/resnet/ResNet-50-train_val.prototxt"
    assert (p.type, p.lr_policy) == ("SGD", "multistep")
    f32 = np.float32  # float fields hold float32 values
    assert (p.base_lr, p.momentum, p.gamma, p.weight_decay) == (f32(0.1), f32(0.9), f32(0.1),
                                                                f32(1e-4))
    assert list(p.stepvalue) == [150000, 300000, 450000] and p.max_iter == 600000
    assert p.iter_size * make_resnet.TRAIN_BATCH == 256  # the paper's mini-batch


def write_tiny_imagenet(path, count, size, seed=0):
    rng = np.random.default_rng(seed)
    with open_db(str(path), "lmdb", "new") as db:
        txn = db.transaction()
        for i in range(count):
            image = rng.integers(0, 256, (3, size, size), dtype=np.uint8)
            txn.put(b"%08d" % i, array_to_datum(image, label=(i * 389) % 1000).SerializeToString())
        txn.commit()


def test_train_val_and_solver_run_one_step_in_both_phases(tmp_path):
    """Shrunk to 64x64 crops (pool5 made global) and batch 2; one SGD step, then a TEST pass."""
    db = tmp_path / "tiny_lmdb"
    write_tiny_imagenet(db, count=4, size=72)
    net_param = read_train_val()
    for layer in net_param.layer:
        if layer.type == "Data":
            layer.data_param.source = str(db)
            layer.data_param.batch_size = 2
            layer.transform_param.crop_size = 64
        if layer.name == "pool5":  # 64 / 32 = 2x2 at res5, smaller than the 7x7 kernel
            layer.pooling_param.ClearField("kernel_size")
            layer.pooling_param.global_pooling = True
    solver_param = caffe_io.read_solver_param(os.path.join(MODELS, "ResNet-50-solver.prototxt"))
    solver_param.ClearField("net")
    solver_param.net_param.CopyFrom(net_param)
    solver_param.iter_size = 1
    solver_param.test_iter[:] = [1]
    solver_param.snapshot = 0
    solver_param.display = 0
    framework.set_random_seed(1)
    solver = framework.get_solver(solver_param)
    train, test = solver.net, solver.test_nets[0]
    assert "accuracy" not in train.blobs and "accuracy_top5" in test.outputs

    # TRAIN BatchNorm uses the batch statistics: per-channel mean 0, variance ~1.
    train.forward(end="bn_conv1")
    y = train.blobs["conv1"].data
    assert y.shape == (2, 64, 32, 32)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, rtol=1e-2)

    w_before = train.params["conv1"][0].data.copy()
    solver.step(1)
    loss = float(train.blobs["loss"].data)
    assert abs(loss - math.log(1000)) < 1.0  # near-uniform scores at initialisation
    assert not np.array_equal(train.params["conv1"][0].data, w_before)
    assert np.abs(train.params["fc1000"][0].diff).sum() > 0
    bn = train.layer_by_name("bn_conv1")
    # scale factor after two TRAIN forwards (the partial one above and the step): 0.999*1 + 1
    assert float(bn.blobs[2].data[0]) == pytest.approx(1.999)

    # The TEST net (sharing the trained weights, as Solver::Test does).
    scores = solver.test(0)
    assert set(scores) == {"accuracy", "accuracy_top5", "loss"}
    assert 0.0 <= scores["accuracy"] <= scores["accuracy_top5"] <= 1.0
    assert np.isfinite(scores["loss"])
    test_bn = test.layer_by_name("bn_conv1")
    assert test_bn.blobs[0] is bn.blobs[0]
    assert float(bn.blobs[2].data[0]) == pytest.approx(1.999)  # TEST does not update the stats

    # TEST BatchNorm (no use_global_stats in the file) normalises with the stored statistics.
    test.forward(end="conv1")
    x = test.blobs["conv1"].data.copy()
    test.forward(start="bn_conv1", end="bn_conv1")
    s = float(bn.blobs[2].data[0])
    mean = bn.blobs[0].data / s
    var = bn.blobs[1].data / s
    expected = (x - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(test.blobs["conv1"].data, expected, rtol=1e-4, atol=1e-4)
