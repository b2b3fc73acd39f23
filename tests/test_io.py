"""framework/io.py: prototxt and binary proto reading/writing, blob conversion, mean files."""
import glob
import gzip
import os

import numpy as np
import pytest

from framework import io
from framework.errors import PrototxtError, WeightsError
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
MODELS = os.path.join(SHARED, "caffe-models")
FIXTURES = os.path.join(SHARED, "caffe-fixtures")


def _prototxts():
    files = sorted(glob.glob(os.path.join(MODELS, "**", "*.prototxt"), recursive=True))
    files += sorted(glob.glob(os.path.join(FIXTURES, "*.prototxt")))
    return files


def _is_solver(path):
    return "solver" in os.path.basename(path)


def _fixture(name):
    path = os.path.join(FIXTURES, name)
    if not os.path.exists(path):
        pytest.fail(f"fixture missing: {path}")
    return path


# -- text format -------------------------------------------------------------------

def test_there_are_model_files_to_parse():
    files = _prototxts()
    assert len(files) >= 50, f"expected the shared Caffe model files under {MODELS}"
    assert sum(map(_is_solver, files)) >= 15


@pytest.mark.parametrize("path", _prototxts(), ids=lambda p: os.path.relpath(p, SHARED))
def test_every_shared_prototxt_parses(path):
    if _is_solver(path):
        solver = io.read_solver_param(path)
        assert isinstance(solver, caffe_pb2.SolverParameter)
        assert solver.ListFields()
    else:
        net = io.read_net_param(path)
        assert isinstance(net, caffe_pb2.NetParameter)
        assert len(net.layer) + len(net.layers) > 0


def test_lenet_prototxt_contents():
    net = io.read_net_param(os.path.join(MODELS, "bvlc/examples/mnist/lenet.prototxt"))
    assert net.name == "LeNet"
    names = [layer.name for layer in net.layer]
    assert names[1:] == ["conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]
    conv1 = net.layer[1]
    assert conv1.type == "Convolution"
    assert conv1.convolution_param.num_output == 20
    assert list(conv1.convolution_param.kernel_size) == [5]
    assert conv1.convolution_param.weight_filler.type == "xavier"
    assert [p.lr_mult for p in conv1.param] == [1, 2]


def test_legacy_v1_syntax_and_solver_fields():
    solver = io.read_solver_param(
        os.path.join(MODELS, "bvlc/examples/mnist/lenet_consolidated_solver.prototxt"))
    layers = solver.net_param.layers
    assert len(layers) > 0 and len(solver.net_param.layer) == 0
    conv = [l for l in layers if l.type == caffe_pb2.V1LayerParameter.CONVOLUTION]
    assert conv and list(conv[0].blobs_lr) == [1, 2]
    assert solver.random_seed == 1701
    assert list(solver.test_iter) == [100, 600]
    assert [list(s.stage) for s in solver.test_state] == [["test-on-test-set"],
                                                           ["test-on-train-set"]]


def test_resnet_old_input_header():
    net = io.read_net_param(os.path.join(MODELS, "resnet/ResNet-50-deploy.prototxt"))
    assert list(net.input) == ["data"]
    assert list(net.input_dim) == [1, 3, 224, 224]
    bn = next(l for l in net.layer if l.type == "BatchNorm")
    assert bn.batch_norm_param.use_global_stats is True


def test_solver_types_read():
    path = os.path.join(MODELS, "bvlc/examples/mnist/lenet_solver_adam.prototxt")
    solver = io.read_solver_param(path)
    assert solver.type == "Adam"
    assert solver.momentum2 == pytest.approx(0.999)
    assert solver.lr_policy == "fixed"


def test_single_quoted_strings(tmp_path):
    path = tmp_path / "q.prototxt"
    path.write_text("name: 'quoted'\nlayer { name: 'a' type: \"ReLU\" bottom: 'x' top: 'x' }\n")
    net = io.read_net_param(path)
    assert net.name == "quoted" and net.layer[0].bottom[0] == "x"


def test_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "lenet.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n    foo: 3\n}\n')
    with pytest.raises(PrototxtError) as info:
        io.read_net_param(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4:5: ")
    assert "foo" in message and "caffe.LayerParameter" in message


def test_unterminated_block_reports_position(tmp_path):
    path = tmp_path / "cut.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n')
    with pytest.raises(PrototxtError, match=r"cut\.prototxt:\d+:\d+: "):
        io.read_net_param(path)


def test_bad_value_reports_position(tmp_path):
    path = tmp_path / "neg.prototxt"
    path.write_text('layer {\n  convolution_param { num_output: -3 }\n}\n')
    with pytest.raises(PrototxtError, match=r"neg\.prototxt:2:\d+: .*-3"):
        io.read_net_param(path)


def test_missing_prototxt_names_path(tmp_path):
    path = tmp_path / "nowhere" / "net.prototxt"
    with pytest.raises(PrototxtError, match="nowhere/net.prototxt: file not found"):
        io.read_net_param(path)


def test_binary_file_given_as_prototxt():
    with pytest.raises(PrototxtError, match="lenet_iter_20.caffemodel"):
        io.read_net_param(_fixture("lenet_iter_20.caffemodel"))


def test_missing_required_field_is_an_error():
    with pytest.raises(PrototxtError, match=r"in\.prototxt: .*clip_param\.max"):
        io.parse_prototxt_text('layer { type: "Clip" clip_param { min: 0 } }',
                               caffe_pb2.NetParameter, source="in.prototxt")


def test_parse_prototxt_text_into_instance():
    layer = caffe_pb2.LayerParameter(name="keep")
    out = io.parse_prototxt_text('type: "Pooling" pooling_param { pool: AVE round_mode: FLOOR }',
                                 layer)
    assert out is layer and layer.name == "keep"
    assert layer.pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert layer.pooling_param.round_mode == caffe_pb2.PoolingParameter.FLOOR


def test_write_prototxt_round_trip(tmp_path):
    net = io.read_net_param(os.path.join(MODELS, "bvlc/examples/mnist/lenet_train_test.prototxt"))
    path = tmp_path / "out.prototxt"
    io.write_prototxt(path, net)
    assert io.read_net_param(path) == net
    assert os.listdir(tmp_path) == ["out.prototxt"]


# -- Caffe-written binary fixtures -------------------------------------------------

def test_lenet_caffemodel():
    net = io.read_binary_proto(_fixture("lenet_iter_20.caffemodel"), caffe_pb2.NetParameter)
    params = {l.name: [io.blob_to_array(b) for b in l.blobs] for l in net.layer if l.blobs}
    assert list(params) == ["conv1", "conv2", "ip1", "ip2"]
    shapes = {name: [a.shape for a in arrays] for name, arrays in params.items()}
    assert shapes == {"conv1": [(20, 1, 5, 5), (20,)], "conv2": [(50, 20, 5, 5), (50,)],
                      "ip1": [(500, 800), (500,)], "ip2": [(10, 500), (10,)]}
    for arrays in params.values():
        assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrays)
        assert np.abs(arrays[0]).max() > 0  # trained weights, not an empty blob


def test_v1_caffemodel_holds_the_same_weights():
    v1 = io.read_binary_proto(_fixture("lenet_iter_20_v1.caffemodel"), caffe_pb2.NetParameter)
    cur = io.read_binary_proto(_fixture("lenet_iter_20.caffemodel"), caffe_pb2.NetParameter)
    assert len(v1.layer) == 0 and len(v1.layers) == 7
    assert list(v1.input) == ["data"] and list(v1.input_dim) == [1, 1, 28, 28]
    assert v1.layers[0].type == caffe_pb2.V1LayerParameter.CONVOLUTION
    current = {l.name: l for l in cur.layer}
    for layer in v1.layers:
        for legacy, blob in zip(layer.blobs, current[layer.name].blobs):
            old, new = io.blob_to_array(legacy), io.blob_to_array(blob)
            assert old.ndim == 4  # legacy num/channels/height/width
            np.testing.assert_array_equal(old.reshape(new.shape), new)
    ip1 = next(l for l in v1.layers if l.name == "ip1")
    assert io.blob_to_array(ip1.blobs[0]).shape == (1, 1, 500, 800)
    assert io.blob_to_array(ip1.blobs[1]).shape == (1, 1, 1, 500)


def test_lenet_solverstate():
    state = io.read_binary_proto(_fixture("lenet_iter_20.solverstate"), caffe_pb2.SolverState)
    assert state.iter == 20
    assert state.learned_net == "lenet_iter_20.caffemodel"
    assert state.current_step == 0
    shapes = [io.blob_to_array(h).shape for h in state.history]
    assert shapes == [(20, 1, 5, 5), (20,), (50, 20, 5, 5), (50,), (500, 800), (500,),
                      (10, 500), (10,)]


def test_mean_binaryproto_matches_the_digits():
    mean = io.load_mean_file(_fixture("mean.binaryproto"))
    assert mean.shape == (1, 28, 28) and mean.dtype == np.float32
    with gzip.open(_fixture("mnist_200-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(200, 28, 28)
    # compute_image_mean.cpp: float sums divided by the image count.
    expected = images.astype(np.float32).sum(axis=0) / np.float32(200)
    np.testing.assert_array_equal(mean[0], expected)


def test_mean_file_round_trip_uses_legacy_dims(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.random((3, 5, 7)).astype(np.float32)
    path = tmp_path / "mean.binaryproto"
    io.save_mean_file(path, mean)
    proto = io.read_binary_proto(path, caffe_pb2.BlobProto)
    assert (proto.num, proto.channels, proto.height, proto.width) == (1, 3, 5, 7)
    assert not proto.HasField("shape")
    np.testing.assert_array_equal(io.load_mean_file(path), mean)
    io.save_mean_file(path, mean[None])  # 1xCxHxW accepted too
    np.testing.assert_array_equal(io.load_mean_file(path), mean)


def test_mean_file_with_shape_field(tmp_path):
    mean = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    path = tmp_path / "m.binaryproto"
    io.write_binary_proto(path, io.array_to_blob_proto(mean))
    np.testing.assert_array_equal(io.load_mean_file(path), mean[0])
    io.write_binary_proto(path, io.array_to_blob_proto(mean[0]))
    np.testing.assert_array_equal(io.load_mean_file(path), mean[0])


def test_mean_file_bad_shape(tmp_path):
    path = tmp_path / "m.binaryproto"
    io.write_binary_proto(path, io.array_to_blob_proto(np.zeros((2, 3, 4, 4), np.float32)))
    with pytest.raises(WeightsError, match=r"m\.binaryproto: mean blob has shape \(2, 3, 4, 4\)"):
        io.load_mean_file(path)
    with pytest.raises(ValueError, match="CxHxW"):
        io.save_mean_file(path, np.zeros((4, 4)))


# -- binary errors and atomic writes ------------------------------------------------

def test_garbage_binary_gives_weights_error(tmp_path):
    path = tmp_path / "garbage.caffemodel"
    path.write_bytes(b"\xff\xfe\x07 this is not a protobuf \x00\x9c")
    with pytest.raises(WeightsError, match=r"garbage\.caffemodel: not a valid binary caffe\.NetParameter"):
        io.read_binary_proto(path, caffe_pb2.NetParameter)


def test_text_prototxt_given_as_binary():
    path = os.path.join(MODELS, "bvlc/examples/mnist/lenet.prototxt")
    with pytest.raises(WeightsError, match="lenet.prototxt"):
        io.read_binary_proto(path, caffe_pb2.NetParameter)


def test_truncated_caffemodel(tmp_path):
    with open(_fixture("lenet_iter_20.caffemodel"), "rb") as f:
        data = f.read()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.caffemodel"):
        io.read_binary_proto(path, caffe_pb2.NetParameter)


def test_missing_binary_names_path(tmp_path):
    with pytest.raises(WeightsError, match=r"absent\.caffemodel: file not found"):
        io.read_binary_proto(tmp_path / "absent.caffemodel", caffe_pb2.NetParameter)


def test_binary_missing_required_field(tmp_path):
    net = caffe_pb2.NetParameter()
    net.layer.add(name="c", type="Clip").clip_param.SetInParent()
    path = tmp_path / "clip.caffemodel"
    path.write_bytes(net.SerializePartialToString())
    with pytest.raises(WeightsError, match=r"clip\.caffemodel: .*clip_param\.min"):
        io.read_binary_proto(path, caffe_pb2.NetParameter)


def test_write_binary_round_trip_leaves_no_temp_file(tmp_path):
    net = io.read_binary_proto(_fixture("lenet_iter_20.caffemodel"), caffe_pb2.NetParameter)
    path = tmp_path / "copy.caffemodel"
    io.write_binary_proto(path, net)
    assert os.listdir(tmp_path) == ["copy.caffemodel"]
    assert io.read_binary_proto(path, caffe_pb2.NetParameter) == net
    with open(_fixture("lenet_iter_20.caffemodel"), "rb") as f:
        assert path.read_bytes() == f.read()  # byte-identical to what Caffe wrote
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~io._UMASK


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "w.binaryproto"
    io.write_binary_proto(path, io.array_to_blob_proto(np.ones(3, np.float32)))
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(WeightsError, match=r"w\.binaryproto: cannot write"):
        io.write_binary_proto(path, io.array_to_blob_proto(np.zeros(5, np.float32)))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.binaryproto"]


def test_write_into_missing_directory(tmp_path):
    with pytest.raises(WeightsError, match="cannot write"):
        io.write_binary_proto(tmp_path / "no" / "x.caffemodel", caffe_pb2.NetParameter())


def _big_net(total_bytes, layers=3):
    net = caffe_pb2.NetParameter(name="big")
    per_layer = total_bytes // 4 // layers
    for i in range(layers):
        layer = net.layer.add(name=f"fc{i}", type="InnerProduct")
        values = np.arange(per_layer, dtype=np.float32)
        values[0] = i
        io.array_to_blob_proto(values, out=layer.blobs.add())
    return net, per_layer


def _check_big_file(tmp_path, total_bytes):
    net, per_layer = _big_net(total_bytes)
    path = tmp_path / "big.caffemodel"
    io.write_binary_proto(path, net)
    del net
    assert os.path.getsize(path) > total_bytes
    loaded = io.read_binary_proto(path, caffe_pb2.NetParameter)
    assert [l.name for l in loaded.layer] == ["fc0", "fc1", "fc2"]
    for i, layer in enumerate(loaded.layer):
        values = io.blob_to_array(layer.blobs[0])
        assert values.shape == (per_layer,)
        assert values[0] == i and values[-1] == np.float32(per_layer - 1)


def test_binary_file_over_64mb(tmp_path):
    _check_big_file(tmp_path, 70 * 2**20)


@pytest.mark.heavy
def test_binary_file_over_1gb(tmp_path):
    _check_big_file(tmp_path, 2**30 + 2**20)


# -- blob conversion ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4, 5), (1, 1, 1, 1, 2), (0, 4)])
def test_array_blob_round_trip(shape):
    rng = np.random.default_rng(len(shape))
    array = rng.standard_normal(shape).astype(np.float32)
    proto = io.array_to_blob_proto(array)
    assert tuple(proto.shape.dim) == shape
    assert len(proto.diff) == 0
    back = io.blob_to_array(proto)
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_round_trip_survives_serialization_with_diff():
    rng = np.random.default_rng(3)
    data = rng.standard_normal((4, 3, 50, 50)).astype(np.float32)  # above the small-field cutoff
    diff = rng.standard_normal(data.shape).astype(np.float32)
    proto = io.array_to_blob_proto(data, write_diff=diff)
    again = caffe_pb2.BlobProto.FromString(proto.SerializeToString())
    np.testing.assert_array_equal(io.blob_to_array(again), data)
    np.testing.assert_array_equal(io.blob_to_array(again, diff=True), diff)
    # the values really sit in the proto's float fields, in C order
    assert list(again.data[:5]) == data.ravel()[:5].tolist()
    assert again.diff[-1] == diff.ravel()[-1]


def test_float64_and_noncontiguous_input_written_as_float32():
    array = np.arange(24, dtype=np.float64).reshape(4, 6).T / 3  # transposed view
    proto = io.array_to_blob_proto(array)
    assert tuple(proto.shape.dim) == (6, 4)
    np.testing.assert_array_equal(io.blob_to_array(proto), array.astype(np.float32))
    assert len(proto.double_data) == 0


def test_converted_array_is_a_writable_copy():
    proto = io.array_to_blob_proto(np.ones((100, 100), np.float32))
    array = io.blob_to_array(proto)
    array[0, 0] = 5
    assert proto.data[0] == 1


def test_legacy_dims_and_double_data():
    proto = caffe_pb2.BlobProto(num=2, channels=1, height=2, width=3)
    proto.double_data.extend(np.arange(12) + 0.5)
    proto.data.extend(np.zeros(12))  # double_data wins, as in blob.cpp
    array = io.blob_to_array(proto)
    assert array.shape == (2, 1, 2, 3) and array.dtype == np.float32
    np.testing.assert_array_equal(array.ravel(), np.arange(12) + 0.5)
    assert io.blob_to_array(proto, dtype=np.float64).dtype == np.float64


def test_legacy_dims_win_over_shape():
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=2)
    proto.shape.dim.extend([4])
    proto.data.extend([1, 2, 3, 4])
    assert io.blob_to_array(proto).shape == (1, 1, 2, 2)


def test_count_mismatch_raises():
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([2, 3])
    proto.data.extend([1.0] * 5)
    with pytest.raises(WeightsError, match=r"shape \(2, 3\) \(count 6\) holds 5 data values"):
        io.blob_to_array(proto)
    with pytest.raises(WeightsError, match="diff"):
        io.blob_to_array(io.array_to_blob_proto(np.ones(3)), diff=True)
    with pytest.raises(ValueError, match="diff has 2 values"):
        io.array_to_blob_proto(np.ones(3), write_diff=np.ones(2))


def test_wire_fallback_path_matches(monkeypatch):
    # Runtimes without upb's __array__ read big fields through the wire bytes.
    rng = np.random.default_rng(5)
    data = rng.standard_normal((64, 65)).astype(np.float32)
    proto = io.array_to_blob_proto(data, write_diff=-data)
    monkeypatch.setattr(io, "_FIELD_HAS_ARRAY", False)
    np.testing.assert_array_equal(io.blob_to_array(proto), data)
    np.testing.assert_array_equal(io.blob_to_array(proto, diff=True), -data)
    doubles = caffe_pb2.BlobProto()
    doubles.shape.dim.append(3000)
    doubles.double_data.extend(np.linspace(0, 1, 3000))
    np.testing.assert_array_equal(io.blob_to_array(doubles, dtype=np.float64),
                                  np.linspace(0, 1, 3000))


def test_out_argument_fills_given_proto():
    net = caffe_pb2.NetParameter()
    blob = net.layer.add(name="a").blobs.add()
    blob.data.extend([9, 9, 9])
    returned = io.array_to_blob_proto(np.full((2, 2), 3, np.float32), out=blob)
    assert returned is blob
    assert list(net.layer[0].blobs[0].data) == [3, 3, 3, 3]


def test_pycaffe_names():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    diff = -array
    proto = io.array_to_blobproto(array, diff)
    np.testing.assert_array_equal(io.blobproto_to_array(proto), array)
    np.testing.assert_array_equal(io.blobproto_to_array(proto, return_diff=True), diff)
