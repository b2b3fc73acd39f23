"""A PyTorch program equivalent to one of our Nets, with a copy of its weights.

``TorchMirror(net, train=False)`` walks ``net.layers`` in order and turns each
layer into a ``torch.nn.functional`` call on a dict of named tensors, with its
own copies of the layer blobs (float32 tensors, ``requires_grad`` in training).
It does what a PyTorch user would write for the same network:

- Convolution -> ``F.conv2d`` (stride, pad, dilation, groups);
- a BatchNorm followed by a Scale on the same blob -> one ``F.batch_norm``
  with the Scale's gamma/beta as its affine weight/bias (as torchvision's
  ResNet); statistics M/s, V/s as Caffe stores them; batch statistics in
  training (``use_global_stats`` false);
- ReLU -> ``F.relu`` (in place when the prototxt is), Pooling -> ``F.max_pool2d``
  / ``F.avg_pool2d`` with ``ceil_mode=True`` (Caffe's rounding; same clipping
  rule for padded windows), LRN -> ``F.local_response_norm`` (same alpha / n
  convention), InnerProduct -> ``F.linear`` on the flattened input, Eltwise ->
  sum / product / max, Softmax -> ``F.softmax``, SoftmaxWithLoss ->
  ``F.cross_entropy``, Dropout -> identity in TEST / ``F.dropout`` in TRAIN,
  Split -> the same tensor, Concat -> ``torch.cat``, Flatten -> ``flatten``.

Anything else raises NotImplementedError naming the layer type.
"""
import numpy as np
import torch
import torch.nn.functional as F


class TorchMirror:
    """PyTorch version of ``net`` (see module doc); call it with the input arrays.

    ``params`` maps (layer name, blob index) to the torch tensor holding that
    blob (for comparing gradients); ``parameters()`` lists the learnable ones.
    """

    def __init__(self, net, train=False):
        self.train = train
        self.ops = []
        self.params = {}
        self.inputs = list(net.inputs)
        self.outputs = list(net.outputs)
        self._buffers = []
        layers = list(zip(net.layer_names, net.layers))
        folded = set()
        for index, (name, layer) in enumerate(layers):
            if name in folded:
                continue
            bottoms = net.bottom_names[name]
            tops = net.top_names[name]
            scale = None
            if layer.type == "BatchNorm" and index + 1 < len(layers):
                next_name, next_layer = layers[index + 1]
                if (next_layer.type == "Scale" and net.bottom_names[next_name] == tops
                        and len(next_layer.blobs) == 2):
                    scale = (next_name, next_layer)
                    folded.add(next_name)
                    tops = net.top_names[next_name]
            self.ops.append(self._make(name, layer, bottoms, tops, scale))

    # -- weights -----------------------------------------------------------------
    def _tensor(self, layer_name, index, array, learnable):
        tensor = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
        if learnable and self.train:
            tensor.requires_grad_(True)
        self.params[(layer_name, index)] = tensor
        return tensor

    def parameters(self):
        """The learnable tensors (those with requires_grad)."""
        return [t for t in self.params.values() if t.requires_grad]

    # -- layers ------------------------------------------------------------------
    def _make(self, name, layer, bottoms, tops, scale):
        kind = layer.type
        p = layer.layer_param
        blobs = [b.data for b in layer.blobs]
        if kind == "Input":
            return None
        if kind == "Convolution":
            cp = p.convolution_param
            weight = self._tensor(name, 0, blobs[0], True)
            bias = self._tensor(name, 1, blobs[1], True) if len(blobs) > 1 else None
            stride, pad, dilation, group = layer.stride, layer.pad, layer.dilation, cp.group

            def conv(env):
                return F.conv2d(env[bottoms[0]], weight, bias, stride, pad, dilation, group)
            return _Op(conv, tops)
        if kind == "BatchNorm":
            eps = layer.eps
            s = float(blobs[2].reshape(-1)[0])
            factor = 0.0 if s == 0 else 1.0 / s
            mean = torch.from_numpy((blobs[0] * factor).astype(np.float32))
            var = torch.from_numpy((blobs[1] * factor).astype(np.float32))
            batch_stats = not layer.use_global_stats
            gamma = beta = None
            if scale is not None:
                scale_name, scale_layer = scale
                gamma = self._tensor(scale_name, 0, scale_layer.blobs[0].data, True)
                beta = self._tensor(scale_name, 1, scale_layer.blobs[1].data, True)

            def batch_norm(env):
                return F.batch_norm(env[bottoms[0]], mean, var, gamma, beta,
                                    training=batch_stats, momentum=0.001, eps=eps)
            return _Op(batch_norm, tops)
        if kind == "Scale":
            gamma = self._tensor(name, 0, blobs[0], True)
            beta = self._tensor(name, 1, blobs[1], True) if len(blobs) > 1 else None
            shape = (1, -1) + (1,) * 2

            def scale_op(env):
                y = env[bottoms[0]] * gamma.view(shape)
                return y + beta.view(shape) if beta is not None else y
            return _Op(scale_op, tops)
        if kind == "ReLU":
            in_place = tops[0] == bottoms[0]
            slope = p.relu_param.negative_slope
            if slope:
                return _Op(lambda env: F.leaky_relu(env[bottoms[0]], slope, inplace=in_place), tops)
            return _Op(lambda env: F.relu(env[bottoms[0]], inplace=in_place), tops)
        if kind == "Pooling":
            pp = p.pooling_param
            kernel = None if layer.global_pooling else layer.kernel
            stride, pad = layer.stride, layer.pad
            ceil = pp.round_mode == 0
            if pp.pool == 0:  # MAX
                def pool(env):
                    x = env[bottoms[0]]
                    return F.max_pool2d(x, kernel or x.shape[2:], stride, pad, ceil_mode=ceil)
            elif pp.pool == 1:  # AVE
                def pool(env):
                    x = env[bottoms[0]]
                    return F.avg_pool2d(x, kernel or x.shape[2:], stride, pad, ceil_mode=ceil,
                                        count_include_pad=True)
            else:
                raise NotImplementedError(f"Pooling method {pp.pool} (layer {name})")
            return _Op(pool, tops)
        if kind == "LRN":
            lp = p.lrn_param
            if lp.norm_region != 0:
                raise NotImplementedError(f"LRN WITHIN_CHANNEL (layer {name})")
            size, alpha, beta, k = lp.local_size, lp.alpha, lp.beta, lp.k
            return _Op(lambda env: F.local_response_norm(env[bottoms[0]], size, alpha, beta, k), tops)
        if kind == "InnerProduct":
            ip = p.inner_product_param
            w = blobs[0].T if ip.transpose else blobs[0]
            weight = self._tensor(name, 0, w, True)
            bias = self._tensor(name, 1, blobs[1], True) if len(blobs) > 1 else None
            axis = ip.axis

            def linear(env):
                return F.linear(env[bottoms[0]].flatten(axis), weight, bias)
            return _Op(linear, tops)
        if kind == "Eltwise":
            ep = p.eltwise_param
            coeffs = list(ep.coeff) or [1.0] * len(bottoms)

            def eltwise(env):
                xs = [env[b] for b in bottoms]
                if ep.operation == 1:  # SUM
                    out = xs[0] * coeffs[0] if coeffs[0] != 1 else xs[0]
                    for c, x in zip(coeffs[1:], xs[1:]):
                        out = out + (x * c if c != 1 else x)
                    return out
                if ep.operation == 0:  # PROD
                    out = xs[0]
                    for x in xs[1:]:
                        out = out * x
                    return out
                out = xs[0]
                for x in xs[1:]:
                    out = torch.maximum(out, x)
                return out
            return _Op(eltwise, tops)
        if kind == "Softmax":
            axis = p.softmax_param.axis
            return _Op(lambda env: F.softmax(env[bottoms[0]], dim=axis), tops)
        if kind == "SoftmaxWithLoss":
            return _Op(lambda env: F.cross_entropy(env[bottoms[0]], env[bottoms[1]].long()), tops)
        if kind == "Dropout":
            ratio = p.dropout_param.dropout_ratio
            train = self.train
            return _Op(lambda env: F.dropout(env[bottoms[0]], ratio, training=train), tops)
        if kind == "Split":
            return _Op(lambda env: tuple(env[bottoms[0]] for _ in tops), tops, multi=True)
        if kind == "Concat":
            axis = p.concat_param.axis
            return _Op(lambda env: torch.cat([env[b] for b in bottoms], dim=axis), tops)
        if kind == "Flatten":
            return _Op(lambda env: env[bottoms[0]].flatten(p.flatten_param.axis), tops)
        raise NotImplementedError(f"no PyTorch equivalent written for layer type {kind} (layer {name})")

    # -- running -------------------------------------------------------------------
    def __call__(self, **inputs):
        """Run the net on numpy arrays or tensors; return {output name: tensor}."""
        env = {name: (torch.from_numpy(value) if isinstance(value, np.ndarray) else value)
               for name, value in inputs.items()}
        for op in self.ops:
            if op is not None:
                op(env)
        return {name: env[name] for name in self.outputs}


class _Op:
    """One layer call: ``fn(env)`` -> tensor (or a tuple for several tops), stored under ``tops``."""

    __slots__ = ("fn", "tops", "multi")

    def __init__(self, fn, tops, multi=False):
        self.fn, self.tops, self.multi = fn, list(tops), multi

    def __call__(self, env):
        out = self.fn(env)
        if self.multi:
            for name, value in zip(self.tops, out):
                env[name] = value
        else:
            env[self.tops[0]] = out
