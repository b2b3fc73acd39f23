"""Fold inference-time BatchNorm (+ Scale) layers into the Convolution before them.

With global statistics (``use_global_stats``, the TEST default) a BatchNorm is an
affine map per channel, and so is a following ``Scale`` (with or without bias):

    conv:  x  = W * in + b                          (b = 0 when bias_term: false)
    BN:    y  = (x - mu) / sqrt(var + eps)          mu = f*M, var = f*V,
                                                    f = 0 if s == 0 else 1/s  (batch_norm_layer.cpp)
    Scale: z  = gamma * y + beta                    (beta = 0 without bias_term)

so  z = W' * in + b'  with  k = gamma / sqrt(var + eps),  W'[c] = k[c] * W[c],
b' = k * (b - mu) + beta.  The fused net keeps the Convolution (now with
``bias_term: true``) and drops the BatchNorm and Scale layers; the Convolution's
top takes the name of the last folded layer's top (in ResNet-style deploy files
they are all in place, so no name changes).

A chain is folded only when it is exact and safe:

- the Convolution has one bottom and one top, ``axis`` 1, unshared parameters and
  no loss weight;
- its output is consumed by that BatchNorm alone (no other layer, no Split, no
  later reader of the same blob version);
- the BatchNorm uses global statistics (``use_global_stats: true``, or unset in
  the TEST phase);
- a Scale is folded too when it alone consumes the BatchNorm's output, has one
  bottom, and scales per channel (``axis: 1`` as written, ``num_axes`` 1); otherwise
  only the BatchNorm is folded and the Scale stays.

Everything else is left as it is, with the reason kept in ``FusedNet.skipped``.

Entry points:

- :func:`fuse_batchnorm` (NetParameter or prototxt path + weights) -> :class:`FusedNet`
  (the fused NetParameter and its weights as arrays);
- :func:`fused_net` (prototxt, weights) -> a ready :class:`framework.Net`;
- :func:`fuse_net` (a built Net) -> a new fused Net;
- ``framework.Net(prototxt, weights, TEST, fuse_batchnorm=True)``;
- ``tools/fuse_batchnorm.py MODEL WEIGHTS OUT_MODEL OUT_WEIGHTS``.
"""
import logging
import os
from collections import OrderedDict, namedtuple

import numpy as np

from proto import caffe_pb2

from . import io as caffe_io
from .errors import NetError, WeightsError
from .net_passes import filter_net, split_blob_name, split_layer_name

log = logging.getLogger("framework.fuse")

Fold = namedtuple("Fold", "conv batchnorm scale top")
Fold.__doc__ = """One folded chain: layer names (``scale`` may be None) and the fused conv's top name."""


class FusedNet(namedtuple("FusedNet", "param weights folds skipped")):
    """Result of :func:`fuse_batchnorm`.

    ``param``: the fused ``NetParameter`` (no ``blobs`` inside); ``weights``: an
    OrderedDict layer name -> list of float32 arrays, one per parameter blob, for
    every layer that had weights; ``folds``: the :class:`Fold` chains removed;
    ``skipped``: (BatchNorm layer name, reason) for each BatchNorm left in place.
    """

    def weights_param(self):
        """The weights as a ``NetParameter`` (a .caffemodel body): the fused layers with their blobs."""
        out = caffe_pb2.NetParameter()
        out.name = self.param.name
        for layer in self.param.layer:
            copy = out.layer.add()
            copy.CopyFrom(layer)
            del copy.blobs[:]
            for array in self.weights.get(layer.name, ()):
                caffe_io.array_to_blob_proto(array, out=copy.blobs.add())
        return out

    def load_into(self, net):
        """Copy ``weights`` into a Net built from ``param`` (shape-checked as Caffe's CopyTrainedLayersFrom)."""
        load_arrays(net, self.weights, source="fused weights")


# ----------------------------------------------------------------------------
# The arithmetic
# ----------------------------------------------------------------------------

def batchnorm_affine(mean_sum, var_sum, scale_factor, eps):
    """(a, c) with BN(x) = a * x + c per channel, from BatchNorm's stored blobs.

    mu = f*M, var = f*V with f = 0 when s == 0 else 1/s (batch_norm_layer.cpp's
    guard), a = 1/sqrt(var + eps), c = -mu * a.  Computed in float64.
    """
    s = float(np.asarray(scale_factor, dtype=np.float64).reshape(-1)[0])
    f = 0.0 if s == 0 else 1.0 / s
    mean = f * np.asarray(mean_sum, dtype=np.float64).reshape(-1)
    var = f * np.asarray(var_sum, dtype=np.float64).reshape(-1)
    a = 1.0 / np.sqrt(var + float(eps))
    return a, -mean * a


def fold_conv_batchnorm(weight, bias, mean_sum, var_sum, scale_factor, eps, gamma=None, beta=None):
    """Fold BatchNorm (and Scale gamma/beta) into convolution weights; return (W', b') as float32.

    ``weight``: (C_out, ...) with the output channel first; ``bias``: (C_out,)
    or None (no bias term); BatchNorm blobs as stored (M, V, s); ``gamma`` /
    ``beta``: the Scale layer's blobs, or None.  W' = k * W per output channel,
    b' = k * (b - mu) + beta with k = gamma / sqrt(var + eps).  The arithmetic is
    float64; W' keeps ``weight``'s shape, b' is (C_out,).
    """
    weight = np.asarray(weight)
    channels = weight.shape[0]
    a, c = batchnorm_affine(mean_sum, var_sum, scale_factor, eps)
    b = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    g = np.ones(channels) if gamma is None else np.asarray(gamma, dtype=np.float64).reshape(-1)
    beta = np.zeros(channels) if beta is None else np.asarray(beta, dtype=np.float64).reshape(-1)
    for name, vec in (("the bias", b), ("BatchNorm statistics", a), ("the Scale", g), ("the Scale bias", beta)):
        if vec.shape != (channels,):
            raise WeightsError(f"cannot fold: {name} has {vec.size} values for {channels} output channels")
    # BN(W*in + b) = a*(W*in + b) + c, then Scale: g*(...) + beta
    k = g * a
    shift = g * (a * b + c) + beta
    new_weight = weight.astype(np.float64) * k.reshape((channels,) + (1,) * (weight.ndim - 1))
    return new_weight.astype(np.float32), shift.astype(np.float32)


# ----------------------------------------------------------------------------
# Finding the chains (a pure pass over a NetParameter)
# ----------------------------------------------------------------------------

def _producers_and_consumers(net_param):
    """Blob versions: source[(i, j)] = (layer, top) feeding bottom j of layer i; readers of each top."""
    last_top, source, readers = {}, {}, {}
    for i, layer in enumerate(net_param.layer):
        for j, blob in enumerate(layer.bottom):
            if blob not in last_top:
                raise NetError(f"Unknown bottom blob '{blob}' (layer '{layer.name}', bottom index {j})")
            source[(i, j)] = last_top[blob]
            readers.setdefault(last_top[blob], []).append((i, j))
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
    return source, readers


def _shared_param_names(net_param):
    """Parameter names (``param { name }``) used by more than one layer."""
    owners = {}
    for layer in net_param.layer:
        for spec in layer.param:
            if spec.name:
                owners.setdefault(spec.name, set()).add(layer.name)
    return {name for name, layers in owners.items() if len(layers) > 1}


def _has_loss_weight(layer):
    return any(w != 0 for w in layer.loss_weight)


def _uses_global_stats(layer, phase):
    p = layer.batch_norm_param
    if p.HasField("use_global_stats"):
        return p.use_global_stats
    layer_phase = layer.phase if layer.HasField("phase") else phase
    return layer_phase == caffe_pb2.TEST  # batch_norm_layer.cpp: default is phase == TEST


def find_folds(net_param):
    """The foldable Convolution -> BatchNorm [-> Scale] chains of a filtered, split-free NetParameter.

    Returns (folds, skipped): a list of :class:`Fold` and a list of
    (BatchNorm name, reason) for BatchNorm layers that cannot be folded.
    """
    layers = net_param.layer
    phase = net_param.state.phase
    source, readers = _producers_and_consumers(net_param)
    shared = _shared_param_names(net_param)
    folds, skipped = [], []

    def sole_reader(i):
        """The one (layer, bottom) reading layer i's only top, or None."""
        found = readers.get((i, 0), [])
        return found[0] if len(found) == 1 and not _has_loss_weight(layers[i]) else None

    for b, bn in enumerate(layers):
        if bn.type != "BatchNorm":
            continue
        if len(bn.bottom) != 1 or len(bn.top) != 1:
            skipped.append((bn.name, "BatchNorm does not have exactly one bottom and one top"))
            continue
        if not _uses_global_stats(bn, phase):
            skipped.append((bn.name, "BatchNorm uses batch statistics (use_global_stats false or TRAIN phase)"))
            continue
        c, top_index = source[(b, 0)]
        conv = layers[c]
        reason = None
        if conv.type != "Convolution":
            reason = f"its bottom is produced by a {conv.type} layer ('{conv.name}'), not a Convolution"
        elif len(conv.bottom) != 1 or len(conv.top) != 1:
            reason = f"Convolution '{conv.name}' has several bottoms or tops"
        elif conv.convolution_param.axis != 1:
            reason = f"Convolution '{conv.name}' has axis {conv.convolution_param.axis} (only 1 is folded)"
        elif any(spec.name in shared for spec in conv.param if spec.name):
            reason = f"Convolution '{conv.name}' shares its parameters with another layer"
        elif sole_reader(c) != (b, 0):
            reason = f"the output of Convolution '{conv.name}' has other consumers"
        if reason:
            skipped.append((bn.name, reason))
            continue
        scale = None
        reader = sole_reader(b)
        if reader is not None:
            candidate = layers[reader[0]]
            sp = candidate.scale_param
            if (candidate.type == "Scale" and len(candidate.bottom) == 1 and len(candidate.top) == 1
                    and sp.num_axes == 1 and sp.axis == 1
                    and not any(spec.name in shared for spec in candidate.param if spec.name)):
                scale = candidate.name
        last = layers[reader[0]] if scale else bn
        folds.append(Fold(conv.name, bn.name, scale, last.top[0]))
    return folds, skipped


def fuse_param(net_param, folds):
    """A copy of ``net_param`` with each fold's BatchNorm/Scale removed and its conv rewired.

    The conv gets ``bias_term: true`` and the chain's last top as its top.
    Layer ``blobs`` are dropped (weights travel separately).
    """
    by_conv = {f.conv: f for f in folds}
    removed = {f.batchnorm for f in folds} | {f.scale for f in folds if f.scale}
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    for layer in net_param.layer:
        if layer.name in removed:
            continue
        copy = out.layer.add()
        copy.CopyFrom(layer)
        del copy.blobs[:]
        fold = by_conv.get(layer.name)
        if fold is not None:
            copy.convolution_param.bias_term = True
            copy.top[0] = fold.top
    return out


# ----------------------------------------------------------------------------
# Weights in and out
# ----------------------------------------------------------------------------

def weights_arrays(weights):
    """Layer name -> list of arrays, from a .caffemodel path, a NetParameter, a Net or a dict."""
    from .net import Net, read_weights_param

    if weights is None:
        raise WeightsError("folding BatchNorm needs the trained weights (got weights=None)")
    if isinstance(weights, dict):
        return OrderedDict((k, list(v)) for k, v in weights.items())
    if isinstance(weights, Net):
        return OrderedDict((name, [blob.data for blob in layer.blobs])
                           for name, layer in zip(weights.layer_names, weights.layers) if layer.blobs)
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if path.endswith(".h5"):
            raise WeightsError(f"{path}: HDF5 weights are not supported by fuse_batchnorm; "
                               f"convert to a binary .caffemodel first")
        weights = read_weights_param(path)
    if isinstance(weights, caffe_pb2.NetParameter):
        arrays = OrderedDict()
        for layer in weights.layer:
            if layer.blobs:
                arrays[layer.name] = [caffe_io.blob_to_array(b) for b in layer.blobs]
        return arrays
    raise TypeError(f"weights must be a path, NetParameter, Net or dict, not {type(weights).__name__}")


def _legacy_match(array_shape, blob_shape):
    """Blob::ShapeEquals for legacy 4-D num/channels/height/width blobs."""
    return (len(array_shape) == 4 and len(blob_shape) <= 4
            and tuple(array_shape) == (1,) * (4 - len(blob_shape)) + tuple(blob_shape))


def load_arrays(net, arrays, source="<weights>"):
    """Copy arrays into the same-named layers of ``net`` (counts and shapes checked, legacy dims allowed)."""
    for name, layer in zip(net.layer_names, net.layers):
        values = arrays.get(name)
        if values is None:
            continue
        if len(values) != len(layer.blobs):
            raise WeightsError(f"{source}: incompatible number of blobs for layer '{name}': "
                               f"{len(values)} given, the net expects {len(layer.blobs)}")
        for j, (value, blob) in enumerate(zip(values, layer.blobs)):
            value = np.asarray(value)
            if value.shape != blob.shape and not _legacy_match(value.shape, blob.shape):
                raise WeightsError(f"{source}: cannot copy param {j} weights of layer '{name}': "
                                   f"shape {value.shape}, the net expects {blob.shape}")
            blob.data[...] = value.reshape(blob.shape)


def _blobs_of(arrays, name, what):
    values = arrays.get(name)
    if values is None:
        raise WeightsError(f"cannot fold {what} '{name}': the weights hold no blobs for it")
    return values


def _strip_auto_splits(net_param):
    """Undo insert_splits: drop Split layers named by its pattern, reading their bottom instead."""
    rename = {}
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    last_producer = {}
    for layer in net_param.layer:
        bottoms = [rename.get(b, b) for b in layer.bottom]
        if layer.type == "Split" and len(bottoms) == 1 and bottoms[0] in last_producer:
            producer, top_index = last_producer[bottoms[0]]
            if layer.name == split_layer_name(producer, bottoms[0], top_index) and all(
                    t == split_blob_name(producer, bottoms[0], top_index, k) for k, t in enumerate(layer.top)):
                for t in layer.top:
                    rename[t] = bottoms[0]
                continue
        copy = out.layer.add()
        copy.CopyFrom(layer)
        del copy.bottom[:]
        copy.bottom.extend(bottoms)
        for j, t in enumerate(layer.top):
            last_producer[t] = (layer.name, j)
    return out


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def fuse_batchnorm(net, weights, phase=None):
    """Fold BatchNorm (+ Scale) into the preceding Convolutions of a net definition.

    ``net``: a prototxt path or a ``NetParameter`` (legacy formats are upgraded);
    ``weights``: a .caffemodel path, a weights ``NetParameter``, a built
    :class:`framework.Net`, or a dict layer name -> list of arrays.
    ``phase``: the phase to filter layers for (default: the NetParameter's
    state, TEST for a path).  Returns a :class:`FusedNet`; the inputs are not
    modified.
    """
    from .net import read_net_param
    from .upgrade import net_needs_upgrade, upgrade_net

    if isinstance(net, caffe_pb2.NetParameter):
        param = caffe_pb2.NetParameter()
        param.CopyFrom(net)
        if net_needs_upgrade(param):
            upgrade_net(param, source=param.name or "<NetParameter>")
    else:
        param = read_net_param(os.fspath(net))
        if phase is None:
            phase = caffe_pb2.TEST
    if phase is not None:
        param.state.phase = phase
    param = filter_net(param)
    arrays = weights_arrays(weights)
    folds, skipped = find_folds(param)
    types = {layer.name: layer for layer in param.layer}
    out_weights = OrderedDict()
    folded_away = {f.batchnorm for f in folds} | {f.scale for f in folds if f.scale}
    by_conv = {f.conv: f for f in folds}
    for layer in param.layer:
        if layer.name in folded_away:
            continue
        fold = by_conv.get(layer.name)
        if fold is None:
            if layer.name in arrays:
                out_weights[layer.name] = arrays[layer.name]
            continue
        conv_blobs = _blobs_of(arrays, fold.conv, "Convolution")
        has_bias = layer.convolution_param.bias_term
        if len(conv_blobs) != 1 + has_bias:
            raise WeightsError(f"cannot fold Convolution '{fold.conv}': {len(conv_blobs)} blobs for "
                               f"bias_term: {str(has_bias).lower()}")
        bn_blobs = _blobs_of(arrays, fold.batchnorm, "BatchNorm")
        if len(bn_blobs) != 3:
            raise WeightsError(f"cannot fold BatchNorm '{fold.batchnorm}': it has {len(bn_blobs)} blobs, "
                               f"expected 3 (mean sum, variance sum, scale factor)")
        gamma = beta = None
        if fold.scale:
            scale_blobs = _blobs_of(arrays, fold.scale, "Scale")
            bias_term = types[fold.scale].scale_param.bias_term
            if len(scale_blobs) != 1 + bias_term:
                raise WeightsError(f"cannot fold Scale '{fold.scale}': {len(scale_blobs)} blobs for "
                                   f"bias_term: {str(bias_term).lower()}")
            gamma = scale_blobs[0]
            beta = scale_blobs[1] if bias_term else None
        weight, bias = fold_conv_batchnorm(
            conv_blobs[0], conv_blobs[1] if has_bias else None, *bn_blobs,
            eps=types[fold.batchnorm].batch_norm_param.eps, gamma=gamma, beta=beta)
        out_weights[fold.conv] = [weight, bias]
    for name, reason in skipped:
        log.info("BatchNorm %s not folded: %s", name, reason)
    log.info("Folded %d BatchNorm layer(s) into convolutions", len(folds))
    return FusedNet(fuse_param(param, folds), out_weights, folds, skipped)


def fused_net(prototxt, weights, phase=None):
    """Build a :class:`framework.Net` with BatchNorm/Scale folded into the convolutions.

    Same arguments as :func:`fuse_batchnorm`; the net's phase is ``phase``
    (default TEST).  Layers the weights do not cover keep their filler values,
    as with ``Net.copy_from``.  The Net's ``fused`` attribute is the
    :class:`FusedNet` (param, folds, skipped) without its weights.
    """
    from .net import Net

    fused = fuse_batchnorm(prototxt, weights, phase=caffe_pb2.TEST if phase is None else phase)
    net = Net(fused.param)
    fused.load_into(net)
    net.fused = fused._replace(weights=None)
    return net


def fuse_net(net):
    """A new Net equal to the built ``net`` with its BatchNorm/Scale folded (``net`` is unchanged).

    The folds use ``net``'s current parameter values and phase; automatic Split
    layers are undone first, then rebuilt by the new Net.  The result's ``fused``
    attribute is the :class:`FusedNet` without its weights.
    """
    from .net import Net

    param = _strip_auto_splits(net.param)
    param.state.phase = net.phase
    fused = fuse_batchnorm(param, net)
    out = Net(fused.param)
    fused.load_into(out)
    out.fused = fused._replace(weights=None)
    return out


__all__ = ["Fold", "FusedNet", "batchnorm_affine", "fold_conv_batchnorm", "find_folds", "fuse_param",
           "fuse_batchnorm", "fused_net", "fuse_net", "load_arrays", "weights_arrays"]
