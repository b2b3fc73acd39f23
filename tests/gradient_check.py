"""One finite-difference gradient checker for every layer (Caffe's test_gradient_check_util idea).

Objective: L = sum over tops of <top.data, R_top> with fixed random R, so the
upstream gradient is R (never trivially zero, unlike a gradient of ones through
a normalisation).  Everything runs in float64.  Parameter blobs are checked too.
"""
import numpy as np

from framework.blob import Blob


def make_blob(array, dtype=np.float64):
    """A Blob holding a copy of ``array`` (float64 by default, for gradient checks)."""
    array = np.asarray(array)
    blob = Blob(array.shape, dtype=dtype)
    blob.data[...] = array
    return blob


def check_gradient(layer, bottom, top, check_bottom=None, check_params=True, step=1e-3,
                   threshold=1e-3, kink=None, kink_range=-1.0, seed=1701, reseed=None,
                   setup=True, top_weights=None):
    """Compare ``layer.backward`` with central differences of the forward.

    layer        -- a Layer (set up here unless setup=False)
    bottom, top  -- lists of Blobs (bottoms hold the input data; in-place allowed)
    check_bottom -- indices of bottoms to check (default: all)
    kink         -- skip elements whose input lies within kink_range of kink (ReLU at 0...)
    reseed       -- callable run before every forward (stochastic layers, e.g. dropout)
    top_weights  -- optional list of booleans: which tops enter the objective
    Raises AssertionError naming the blob and element on the first mismatch.
    """
    for blob in list(bottom) + list(top):
        blob.set_dtype(np.float64)
    if setup:
        if reseed:
            reseed()
        layer.setup_layer(bottom, top)
    for blob in layer.blobs:
        blob.set_dtype(np.float64)
    if check_bottom is None:
        check_bottom = range(len(bottom))
    base_inputs = [b.data.copy() for b in bottom]
    rng = np.random.default_rng(seed)

    def run_forward():
        for b, x in zip(bottom, base_inputs):
            b.data[...] = x
        if reseed:
            reseed()
        layer.reshape(bottom, top)
        layer.forward(bottom, top)

    run_forward()
    weights = [rng.standard_normal(t.shape) for t in top]
    if top_weights is not None:
        weights = [w if use else np.zeros_like(w) for w, use in zip(weights, top_weights)]

    def objective():
        return sum(float(np.sum(t.data * w)) for t, w in zip(top, weights))

    # analytic gradients
    for p in layer.blobs:
        p.diff[...] = 0
    for b in bottom:
        b.diff[...] = 0
    for t, w in zip(top, weights):
        t.diff[...] = w
    propagate = [i in check_bottom for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    analytic = {("bottom", i): bottom[i].diff.copy() for i in check_bottom}
    targets = [("bottom", i, bottom[i]) for i in check_bottom]
    if check_params:
        analytic.update({("param", i): p.diff.copy() for i, p in enumerate(layer.blobs)})
        targets += [("param", i, p) for i, p in enumerate(layer.blobs)]

    for kind, index, blob in targets:
        source = base_inputs[index] if kind == "bottom" else blob.data
        grad = analytic[(kind, index)]
        flat = source.reshape(-1)
        for j in range(flat.size):
            x0 = flat[j]
            if kink is not None and kind == "bottom" and abs(x0 - kink) < kink_range:
                continue
            flat[j] = x0 + step
            run_forward()
            plus = objective()
            flat[j] = x0 - step
            run_forward()
            minus = objective()
            flat[j] = x0
            numeric = (plus - minus) / (2 * step)
            a = grad.reshape(-1)[j]
            scale = max(abs(a), abs(numeric), 1.0)
            if abs(a - numeric) > threshold * scale:
                raise AssertionError(
                    f"{layer.type} {kind} {index} element {np.unravel_index(j, grad.shape)}: "
                    f"analytic {a:.6g} vs numeric {numeric:.6g}")
    run_forward()
    return analytic


def layer_from_text(text, phase=0):
    """Build a layer from the text of a LayerParameter (``type: "ReLU" ...``)."""
    from google.protobuf import text_format

    import layers  # noqa: F401  (registers the layer types)
    from framework.layer import create_layer
    from proto import caffe_pb2

    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    if not param.name:
        param.name = param.type.lower() or "layer"
    return create_layer(param, phase)
