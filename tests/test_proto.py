"""proto/caffe.proto: generated module freshness and Caffe-compatible numbers/defaults."""
import importlib.util
import os
import subprocess
import sys

import pytest

from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _regen_tool():
    spec = importlib.util.spec_from_file_location(
        "regen_proto", os.path.join(ROOT, "tools", "regen_proto.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed_module_text():
    with open(os.path.join(ROOT, "proto", "caffe_pb2.py"), encoding="utf-8") as f:
        return f.read()


# -- staleness -----------------------------------------------------------------

def test_committed_module_matches_fresh_generation(tmp_path):
    # Needs grpcio-tools (test extra); a missing compiler is a failure, not a skip.
    tool = _regen_tool()
    fresh = tool.generate(str(tmp_path))
    committed = _committed_module_text()
    assert tool.serialized_descriptor(fresh) is not None
    assert not tool.is_stale(committed, fresh), \
        "proto/caffe_pb2.py is stale: run python tools/regen_proto.py"


def test_check_detects_a_changed_schema(tmp_path):
    tool = _regen_tool()
    with open(os.path.join(ROOT, "proto", "caffe.proto"), encoding="utf-8") as f:
        text = f.read()
    edited = text.replace("message BlobShape {\n",
                          "message BlobShape {\n  optional int32 extra_field = 99;\n", 1)
    assert edited != text
    (tmp_path / "caffe.proto").write_text(edited, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    fresh = tool.generate(str(out), proto_dir=str(tmp_path))
    assert tool.is_stale(_committed_module_text(), fresh)
    assert tool.is_stale("no descriptor here", fresh)


def test_check_command_exits_zero_on_committed_module():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "regen_proto.py"),
                             "--check"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_module_is_the_one_in_this_repo():
    assert os.path.dirname(os.path.abspath(caffe_pb2.__file__)) == os.path.join(ROOT, "proto")
    assert caffe_pb2.DESCRIPTOR.package == "caffe"
    # proto2: optional scalars track presence (Caffe relies on has_xxx()).
    assert not caffe_pb2.BatchNormParameter().HasField("use_global_stats")


# -- field numbers ---------------------------------------------------------------

FIELD_NUMBERS = [
    ("BlobShape", "dim", 1), ("BlobProto", "shape", 7), ("BlobProto", "data", 5),
    ("BlobProto", "diff", 6), ("BlobProto", "double_data", 8), ("BlobProto", "double_diff", 9),
    ("BlobProto", "num", 1), ("BlobProto", "width", 4), ("Datum", "encoded", 7),
    ("NetParameter", "layer", 100), ("NetParameter", "layers", 2), ("NetParameter", "input_dim", 4),
    ("NetParameter", "input_shape", 8), ("NetParameter", "state", 6),
    ("SolverParameter", "net", 24), ("SolverParameter", "train_net_param", 21),
    ("SolverParameter", "type", 40), ("SolverParameter", "clip_gradients", 35),
    ("SolverParameter", "iter_size", 36), ("SolverParameter", "stepvalue", 34),
    ("SolverParameter", "regularization_type", 29), ("SolverParameter", "delta", 31),
    ("SolverParameter", "momentum2", 39), ("SolverParameter", "rms_decay", 38),
    ("SolverParameter", "layer_wise_reduce", 41), ("SolverParameter", "weights", 42),
    ("SolverParameter", "solver_type", 30), ("SolverParameter", "snapshot_format", 37),
    ("SolverParameter", "random_seed", 20), ("SolverState", "history", 3),
    ("SolverState", "current_step", 4), ("NetStateRule", "not_stage", 5),
    ("ParamSpec", "decay_mult", 4), ("LayerParameter", "phase", 10),
    ("LayerParameter", "propagate_down", 11), ("LayerParameter", "transform_param", 100),
    ("LayerParameter", "loss_param", 101), ("LayerParameter", "accuracy_param", 102),
    ("LayerParameter", "convolution_param", 106), ("LayerParameter", "pooling_param", 121),
    ("LayerParameter", "batch_norm_param", 139), ("LayerParameter", "elu_param", 140),
    ("LayerParameter", "bias_param", 141), ("LayerParameter", "scale_param", 142),
    ("LayerParameter", "input_param", 143), ("LayerParameter", "crop_param", 144),
    ("LayerParameter", "parameter_param", 145), ("LayerParameter", "recurrent_param", 146),
    ("LayerParameter", "swish_param", 147), ("LayerParameter", "clip_param", 148),
    ("LayerParameter", "prelu_param", 131), ("LayerParameter", "python_param", 130),
    ("LayerParameter", "spp_param", 132), ("LayerParameter", "tile_param", 138),
    ("LayerParameter", "window_data_param", 129), ("LayerParameter", "embed_param", 137),
    ("ConvolutionParameter", "dilation", 18), ("ConvolutionParameter", "stride", 6),
    ("ConvolutionParameter", "axis", 16), ("ConvolutionParameter", "force_nd_im2col", 17),
    ("PoolingParameter", "round_mode", 13), ("PoolingParameter", "global_pooling", 12),
    ("PoolingParameter", "pad", 4), ("ConcatParameter", "axis", 2),
    ("ConcatParameter", "concat_dim", 1), ("SliceParameter", "axis", 3),
    ("DataParameter", "backend", 8), ("DataParameter", "prefetch", 10),
    ("TransformationParameter", "force_gray", 7), ("LossParameter", "normalization", 3),
    ("InfogainLossParameter", "axis", 2), ("SPPParameter", "engine", 6),
    ("V1LayerParameter", "param", 1001), ("V1LayerParameter", "blob_share_mode", 1002),
    ("V1LayerParameter", "blobs_lr", 7), ("V1LayerParameter", "weight_decay", 8),
    ("V1LayerParameter", "loss_weight", 35), ("V1LayerParameter", "layer", 1),
    ("V1LayerParameter", "include", 32), ("V1LayerParameter", "exp_param", 41),
    ("V1LayerParameter", "loss_param", 42), ("V1LayerParameter", "transform_param", 36),
    ("V0LayerParameter", "k", 22), ("V0LayerParameter", "blobs", 50),
    ("V0LayerParameter", "concat_dim", 65), ("V0LayerParameter", "hdf5_output_param", 1001),
]


@pytest.mark.parametrize("message,field,number", FIELD_NUMBERS)
def test_field_number(message, field, number):
    descriptor = getattr(caffe_pb2, message).DESCRIPTOR
    assert descriptor.fields_by_name[field].number == number


def test_packed_blob_fields():
    fields = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name
    for name in ("data", "diff", "double_data", "double_diff"):
        assert fields[name].GetOptions().packed
    assert caffe_pb2.BlobShape.DESCRIPTOR.fields_by_name["dim"].GetOptions().packed
    assert not caffe_pb2.Datum.DESCRIPTOR.fields_by_name["float_data"].GetOptions().packed


def test_every_layer_specific_param_exists():
    names = set(caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name)
    expected = {
        "accuracy", "argmax", "batch_norm", "bias", "clip", "concat", "contrastive_loss",
        "convolution", "crop", "data", "dropout", "dummy_data", "eltwise", "elu", "embed", "exp",
        "flatten", "hdf5_data", "hdf5_output", "hinge_loss", "image_data", "infogain_loss",
        "inner_product", "input", "log", "lrn", "memory_data", "mvn", "parameter", "pooling",
        "power", "prelu", "python", "recurrent", "reduction", "relu", "reshape", "scale",
        "sigmoid", "softmax", "spp", "slice", "swish", "tanh", "threshold", "tile", "window_data",
    }
    assert {n + "_param" for n in expected} <= names
    layer_specific = {n for n in names if n.endswith("_param")} - {"transform_param", "loss_param"}
    assert layer_specific == {n + "_param" for n in expected}


# -- defaults --------------------------------------------------------------------

def test_batch_norm_defaults():
    p = caffe_pb2.BatchNormParameter()
    assert p.moving_average_fraction == pytest.approx(0.999, rel=1e-7)
    assert p.eps == pytest.approx(1e-5, rel=1e-7)
    assert not p.HasField("use_global_stats")


def test_lrn_defaults():
    p = caffe_pb2.LRNParameter()
    assert (p.local_size, p.alpha, p.beta, p.k) == (5, 1.0, 0.75, 1.0)
    assert p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS == 0
    assert caffe_pb2.LRNParameter.WITHIN_CHANNEL == 1


def test_pooling_defaults_and_enums():
    p = caffe_pb2.PoolingParameter()
    assert p.pool == caffe_pb2.PoolingParameter.MAX == 0
    assert caffe_pb2.PoolingParameter.AVE == 1 and caffe_pb2.PoolingParameter.STOCHASTIC == 2
    assert (p.pad, p.stride, p.pad_h, p.pad_w) == (0, 1, 0, 0)
    assert p.round_mode == caffe_pb2.PoolingParameter.CEIL == 0
    assert caffe_pb2.PoolingParameter.FLOOR == 1
    assert p.global_pooling is False


def test_solver_defaults():
    s = caffe_pb2.SolverParameter()
    assert s.type == "SGD"
    assert s.regularization_type == "L2"
    assert s.clip_gradients == -1
    assert s.iter_size == 1 and s.average_loss == 1
    assert s.delta == pytest.approx(1e-8, rel=1e-6)
    assert s.momentum2 == pytest.approx(0.999, rel=1e-7)
    assert s.rms_decay == pytest.approx(0.99, rel=1e-7)
    assert s.random_seed == -1
    assert s.solver_mode == caffe_pb2.SolverParameter.GPU
    assert s.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO
    assert s.solver_type == caffe_pb2.SolverParameter.SGD
    assert caffe_pb2.SolverParameter.ADAM == 5 and caffe_pb2.SolverParameter.NESTEROV == 1
    assert s.test_initialization is True and s.snapshot_after_train is True
    assert s.layer_wise_reduce is True
    assert s.test_interval == 0 and s.snapshot == 0


def test_other_defaults():
    assert caffe_pb2.FillerParameter().type == "constant"
    assert caffe_pb2.FillerParameter().std == 1 and caffe_pb2.FillerParameter().max == 1
    assert caffe_pb2.FillerParameter().sparse == -1
    assert caffe_pb2.FillerParameter().variance_norm == caffe_pb2.FillerParameter.FAN_IN
    assert caffe_pb2.FillerParameter.AVERAGE == 2
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.TRAIN == 0 and caffe_pb2.TEST == 1
    assert caffe_pb2.ParamSpec().lr_mult == 1 and caffe_pb2.ParamSpec().decay_mult == 1
    assert caffe_pb2.ParamSpec.PERMISSIVE == 1
    conv = caffe_pb2.ConvolutionParameter()
    assert conv.bias_term is True and conv.group == 1 and conv.axis == 1
    assert conv.engine == caffe_pb2.ConvolutionParameter.DEFAULT
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID == 1
    assert caffe_pb2.LossParameter.BATCH_SIZE == 2 and caffe_pb2.LossParameter.NONE == 3
    assert caffe_pb2.DataParameter().backend == caffe_pb2.DataParameter.LEVELDB
    assert caffe_pb2.DataParameter().prefetch == 4
    assert caffe_pb2.EltwiseParameter().operation == caffe_pb2.EltwiseParameter.SUM == 1
    assert caffe_pb2.EltwiseParameter().stable_prod_grad is True
    assert caffe_pb2.MVNParameter().eps == pytest.approx(1e-9, rel=1e-6)
    assert caffe_pb2.ExpParameter().base == -1 and caffe_pb2.LogParameter().base == -1
    assert caffe_pb2.FlattenParameter().end_axis == -1
    assert caffe_pb2.ReshapeParameter().num_axes == -1
    assert caffe_pb2.ReductionParameter().operation == caffe_pb2.ReductionParameter.SUM == 1
    assert caffe_pb2.ReductionParameter.MEAN == 4
    assert caffe_pb2.CropParameter().axis == 2
    assert caffe_pb2.ScaleParameter().bias_term is False and caffe_pb2.ScaleParameter().num_axes == 1
    assert caffe_pb2.HingeLossParameter().norm == caffe_pb2.HingeLossParameter.L1 == 1
    assert caffe_pb2.ImageDataParameter().batch_size == 1
    assert caffe_pb2.ImageDataParameter().is_color is True
    assert caffe_pb2.WindowDataParameter().crop_mode == "warp"
    assert caffe_pb2.WindowDataParameter().fg_fraction == 0.25
    assert caffe_pb2.DropoutParameter().dropout_ratio == 0.5
    assert caffe_pb2.SwishParameter().beta == 1
    assert caffe_pb2.ContrastiveLossParameter().margin == 1
    assert caffe_pb2.PReLUParameter().channel_shared is False
    assert caffe_pb2.PythonParameter().param_str == ""
    assert caffe_pb2.V0LayerParameter().det_crop_mode == "warp"
    assert caffe_pb2.V0LayerParameter().biasterm is True


def test_legacy_enums():
    v1 = caffe_pb2.V1LayerParameter
    assert (v1.CONVOLUTION, v1.POOLING, v1.INNER_PRODUCT, v1.RELU) == (4, 17, 14, 18)
    assert (v1.ABSVAL, v1.DECONVOLUTION, v1.CONTRASTIVE_LOSS, v1.SILENCE) == (35, 39, 37, 36)
    assert (v1.SOFTMAX_LOSS, v1.DUMMY_DATA, v1.SLICE, v1.THRESHOLD) == (21, 32, 33, 31)
    assert len(v1.LayerType.keys()) == 40
    assert v1.PERMISSIVE == 1
    assert caffe_pb2.V0LayerParameter.STOCHASTIC == 2


def test_clip_min_max_are_required():
    clip = caffe_pb2.ClipParameter(min=0.0)
    assert not clip.IsInitialized()
    clip.max = 6.0
    assert clip.IsInitialized()
