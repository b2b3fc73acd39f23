"""Tests of framework/fillers.py against Caffe's filler.hpp.

Random fillers are checked statistically on large blobs, with tolerances several
standard errors wide but far tighter than the gap between the right formula and
the nearest wrong one (e.g. FAN_IN vs FAN_OUT); each such test also asserts that
the wrong alternatives fall outside its tolerance, so it cannot pass by accident.
"""
import math

import numpy as np
import pytest

import framework
from framework.blob import Blob
from framework.errors import CaffeError
from framework.fillers import FILLERS, fill
from proto import caffe_pb2

FP = caffe_pb2.FillerParameter

# 32 outputs x 128 inputs x 3 x 3: filler.hpp's fan_in = count / shape(0) = 1152,
# fan_out = count / shape(1) = 288, their average 720.
CONV_SHAPE = (32, 128, 3, 3)
CONV_FANS = {"FAN_IN": 1152, "FAN_OUT": 288, "AVERAGE": 720}


@pytest.fixture(autouse=True)
def seeded():
    framework.set_random_seed(1701)


def filled(shape, **fields):
    """The float64 values of a float32 Blob of ``shape`` filled from FillerParameter(**fields)."""
    blob = Blob(shape)
    assert fill(blob, FP(**fields)) is blob
    assert blob.data.dtype == np.float32 and blob.shape == tuple(shape)
    return blob.data.astype(np.float64)


def assert_close_and_distinct(measured, expected, rel, wrong):
    """``measured`` within ``rel`` of ``expected``, and every value in ``wrong`` outside it."""
    assert abs(measured / expected - 1) < rel, (measured, expected)
    for other in wrong:
        assert abs(other / expected - 1) > 2 * rel, (other, expected)  # the test discriminates


# ---------------------------------------------------------------------------------------
# constant, uniform, gaussian
# ---------------------------------------------------------------------------------------

def test_constant():
    values = filled((3, 4, 5), type="constant", value=-2.5)
    assert np.all(values == -2.5)


def test_default_filler_parameter_is_constant_zero():
    blob = Blob((4, 3))
    blob.data[...] = 7
    fill(blob, FP())  # caffe.proto: type defaults to "constant", value to 0
    assert np.all(blob.data == 0)


def test_uniform_bounds_and_moments():
    lo, hi = -0.3, 0.7
    values = filled((200, 1000), type="uniform", min=lo, max=hi)
    assert values.min() >= np.float32(lo) and values.max() <= np.float32(hi)
    # 2e5 samples: the extremes lie within ~1e-5 of the bounds, the mean within ~7e-4
    assert values.min() < lo + 1e-3 and values.max() > hi - 1e-3
    assert values.mean() == pytest.approx((lo + hi) / 2, abs=4e-3)
    assert values.std() == pytest.approx((hi - lo) / math.sqrt(12), rel=1e-2)


def test_uniform_default_is_zero_one():
    values = filled((10000,), type="uniform")  # caffe.proto: min 0, max 1
    assert values.min() >= 0 and values.max() <= 1 and values.mean() == pytest.approx(0.5, abs=0.02)


def test_gaussian_mean_and_std():
    values = filled((100, 2000), type="gaussian", mean=1.5, std=0.2)
    # standard errors: mean 4.5e-4, std 3.2e-4
    assert values.mean() == pytest.approx(1.5, abs=3e-3)
    assert values.std() == pytest.approx(0.2, rel=1e-2)
    assert np.count_nonzero(values) == values.size  # sparse defaults to -1: dense


def test_same_seed_same_values_other_seed_other_values():
    framework.set_random_seed(5)
    a = filled((50,), type="gaussian")
    b = filled((50,), type="gaussian")
    framework.set_random_seed(5)
    assert np.array_equal(filled((50,), type="gaussian"), a)
    assert not np.array_equal(a, b)
    framework.set_random_seed(6)
    assert not np.array_equal(filled((50,), type="gaussian"), a)


# ---------------------------------------------------------------------------------------
# sparse gaussian
# ---------------------------------------------------------------------------------------

def test_sparse_gaussian_keeps_sparse_over_shape0():
    # filler.hpp: each element survives a Bernoulli(sparse / shape(0)) mask.
    shape = (20, 80, 5, 5)
    values = filled(shape, type="gaussian", mean=0.0, std=1.0, sparse=5)
    fraction = np.count_nonzero(values) / values.size
    # 40000 draws: standard error 0.0022 around 5/20
    assert_close_and_distinct(fraction, 5 / 20, 0.06, wrong=[5 / 80, 5 / (80 * 25), 1.0])
    kept = values[values != 0]
    assert kept.std() == pytest.approx(1.0, rel=0.03)  # the survivors are the gaussian draws
    # the mask is drawn per element, not per output row
    per_row = np.count_nonzero(values.reshape(20, -1), axis=1)
    assert len(set(per_row.tolist())) > 1


def test_sparse_gaussian_one_axis_and_the_extremes():
    values = filled((4000,), type="gaussian", sparse=1000)
    assert np.count_nonzero(values) / values.size == pytest.approx(0.25, abs=0.03)
    assert np.all(filled((30, 7), type="gaussian", sparse=0) == 0)
    assert np.count_nonzero(filled((30, 7), type="gaussian", sparse=30)) == 30 * 7  # p = 1


def test_sparse_gaussian_parameter_errors():
    # filler.hpp: CHECK_GE(sparse, -1); CHECK_GE(num_axes, 1);
    # math_functions.cpp caffe_rng_bernoulli: CHECK_LE(p, 1)
    with pytest.raises(CaffeError, match="sparse"):
        filled((10, 10), type="gaussian", sparse=-2)
    with pytest.raises(CaffeError, match="sparse"):
        filled((10, 10), type="gaussian", sparse=11)
    with pytest.raises(CaffeError, match="at least one axis"):
        filled((), type="gaussian", sparse=1)


@pytest.mark.parametrize("kind", ["constant", "uniform", "positive_unitball", "xavier", "msra",
                                  "bilinear"])
def test_sparse_is_refused_by_the_other_fillers(kind):
    # filler.hpp: CHECK_EQ(sparse, -1) << "Sparsity not supported by this Filler."
    with pytest.raises(CaffeError, match=f"sparsity is not supported by the '{kind}' filler"):
        filled((2, 2, 4, 4), type=kind, sparse=1)


def test_uniform_and_gaussian_parameter_errors():
    # math_functions.cpp: caffe_rng_uniform CHECK_LE(a, b); caffe_rng_gaussian CHECK_GT(sigma, 0)
    with pytest.raises(CaffeError, match="min.*max"):
        filled((5,), type="uniform", min=1.0, max=0.5)
    assert np.all(filled((5,), type="uniform", min=0.5, max=0.5) == 0.5)  # a == b is allowed
    for std in (0.0, -1.0):
        with pytest.raises(CaffeError, match="std"):
            filled((5,), type="gaussian", std=std)


# ---------------------------------------------------------------------------------------
# positive_unitball
# ---------------------------------------------------------------------------------------

def test_positive_unitball_rows_sum_to_one():
    shape = (6, 3, 4, 5)
    values = filled(shape, type="positive_unitball")
    assert np.all(values >= 0) and np.all(values <= 1)
    # filler.hpp: dim = count / num; each of the num rows of dim values sums to 1
    np.testing.assert_allclose(values.reshape(6, -1).sum(axis=1), 1.0, rtol=1e-5)
    assert len(np.unique(values)) > values.size // 2  # random, not a constant 1/dim


def test_positive_unitball_one_axis_is_all_ones():
    # num = shape(0) = count, so dim = 1 and every value is divided by itself
    np.testing.assert_allclose(filled((7,), type="positive_unitball"), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# xavier and msra
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_xavier_scale_follows_variance_norm(norm):
    values = filled(CONV_SHAPE, type="xavier", variance_norm=FP.VarianceNorm.Value(norm))
    scale = math.sqrt(3.0 / CONV_FANS[norm])
    wrong = [math.sqrt(3.0 / n) for k, n in CONV_FANS.items() if k != norm]
    # filler.hpp: uniform in [-sqrt(3 / n), sqrt(3 / n)]; 36864 draws reach the bound closely
    assert np.abs(values).max() <= np.float32(scale) * (1 + 1e-6)
    assert_close_and_distinct(np.abs(values).max(), scale, 2e-3, wrong)
    # and the spread matches: std = scale / sqrt(3) (standard error ~0.3 %)
    assert_close_and_distinct(values.std(), scale / math.sqrt(3), 0.02,
                              [w / math.sqrt(3) for w in wrong])
    assert abs(values.mean()) < 0.02 * scale


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_msra_std_follows_variance_norm(norm):
    values = filled(CONV_SHAPE, type="msra", variance_norm=FP.VarianceNorm.Value(norm))
    std = math.sqrt(2.0 / CONV_FANS[norm])
    wrong = [math.sqrt(2.0 / n) for k, n in CONV_FANS.items() if k != norm]
    # filler.hpp: gaussian, mean 0, std sqrt(2 / n); standard error of the std ~0.37 %
    assert_close_and_distinct(values.std(), std, 0.02, wrong)
    assert abs(values.mean()) < 0.02 * std


def test_xavier_default_is_fan_in_and_inner_product_shape():
    # an InnerProduct weight (num_output, inputs) = (40, 1000): fan_in 1000, fan_out 40
    values = filled((40, 1000), type="xavier")
    assert_close_and_distinct(np.abs(values).max(), math.sqrt(3.0 / 1000), 2e-3,
                              [math.sqrt(3.0 / 40), math.sqrt(3.0 / 520)])


def test_msra_one_axis_blob():
    # one axis: fan_in = count / shape(0) = 1, fan_out = count (no shape(1))
    values = filled((20000,), type="msra", variance_norm=FP.FAN_OUT)
    assert_close_and_distinct(values.std(), math.sqrt(2.0 / 20000), 0.03,
                              [math.sqrt(2.0), math.sqrt(2.0 / 10000.5)])
    values = filled((20000,), type="msra")
    assert values.std() == pytest.approx(math.sqrt(2.0), rel=0.03)


def test_fillers_through_a_net(tmp_path):
    """weight_filler / bias_filler of a Convolution reach its blobs, reproducibly."""
    path = tmp_path / "net.prototxt"
    path.write_text("""
        layer { name: "x" type: "Input" top: "x"
                input_param { shape { dim: 1 dim: 128 dim: 8 dim: 8 } } }
        layer { name: "conv" type: "Convolution" bottom: "x" top: "y"
                convolution_param { num_output: 32 kernel_size: 3
                                    weight_filler { type: "msra" variance_norm: FAN_OUT }
                                    bias_filler { type: "constant" value: 0.25 } } }""")
    framework.set_random_seed(3)
    net = framework.Net(str(path), framework.TEST)
    weights, bias = (b.data for b in net.params["conv"])
    assert weights.shape == CONV_SHAPE
    assert_close_and_distinct(float(weights.std()), math.sqrt(2.0 / 288), 0.02,
                              [math.sqrt(2.0 / 1152), math.sqrt(2.0 / 720)])
    assert np.all(bias == np.float32(0.25))
    framework.set_random_seed(3)
    again = framework.Net(str(path), framework.TEST)
    assert np.array_equal(again.params["conv"][0].data, weights)


# ---------------------------------------------------------------------------------------
# bilinear
# ---------------------------------------------------------------------------------------

def caffe_bilinear(shape):
    """BilinearFiller's loop, element by element over the flat blob (filler.hpp)."""
    count = int(np.prod(shape))
    height, width = shape[2], shape[3]
    f = math.ceil(width / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    out = np.empty(count)
    for i in range(count):
        x = i % width
        y = (i // width) % height
        out[i] = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
    return out.reshape(shape)


def test_bilinear_4x4_exact():
    shape = (3, 2, 4, 4)
    values = filled(shape, type="bilinear")
    np.testing.assert_allclose(values, caffe_bilinear(shape), rtol=0, atol=1e-7)
    # factor-2 upsampling kernel: f = 2, c = 0.75, 1-D weights 1/4, 3/4, 3/4, 1/4
    one_d = np.array([0.25, 0.75, 0.75, 0.25])
    for kernel in values.reshape(-1, 4, 4):
        np.testing.assert_array_equal(kernel, np.outer(one_d, one_d))


def test_bilinear_5x5_and_3x3():
    values = filled((1, 1, 5, 5), type="bilinear")  # factor 3: f = 3, c = 2/3
    one_d = np.array([1, 2, 3, 2, 1]) / 3.0
    np.testing.assert_allclose(values[0, 0], np.outer(one_d, one_d), atol=1e-7)
    np.testing.assert_allclose(values, caffe_bilinear((1, 1, 5, 5)), atol=1e-7)
    values = filled((2, 3, 3, 3), type="bilinear")
    np.testing.assert_allclose(values, caffe_bilinear((2, 3, 3, 3)), atol=1e-7)


def test_bilinear_errors():
    # filler.hpp: CHECK_EQ(num_axes, 4) "Blob must be 4 dim."; CHECK_EQ(width, height)
    with pytest.raises(CaffeError, match="4-D"):
        filled((2, 4, 4), type="bilinear")
    with pytest.raises(CaffeError, match="square"):
        filled((1, 1, 4, 3), type="bilinear")


# ---------------------------------------------------------------------------------------
# unknown type
# ---------------------------------------------------------------------------------------

def test_unknown_filler_type_lists_the_known_ones():
    with pytest.raises(CaffeError, match="unknown filler type 'gausian'") as info:
        filled((3,), type="gausian")
    for name in ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra",
                 "bilinear"):
        assert name in str(info.value)
    assert set(FILLERS) == {"constant", "uniform", "gaussian", "positive_unitball", "xavier",
                            "msra", "bilinear"}  # filler.hpp GetFiller's list
