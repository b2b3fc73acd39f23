"""The Layer base class and the registry of layer types.

Lifecycle (fixed by the base class, as in Caffe's layer.hpp):
``setup_layer`` runs blob-count checks -> ``setup`` (read parameters, create
``self.blobs``) -> ``reshape`` -> loss weights.  Before every forward the net
calls ``reshape``; then ``forward(bottom, top)``; in training
``backward(top, propagate_down, bottom)``.

Gradient rules for subclasses:
- bottom diffs are *assigned* (overwritten) by ``backward``;
- parameter diffs (``self.blobs[i].diff``) *accumulate* (``+=``); the solver clears them;
- loss layers scale their gradient by ``top[0].diff`` (the net stores the loss
  weight there), so ``loss_weight`` works without the layer knowing it;
- honour ``propagate_down[i]``: skip computing bottom i's diff when False;
- in-place layers (``top[0] is bottom[0]``) must keep what backward needs before
  overwriting.
Layers compute in the dtype of their bottoms (float32 normally, float64 in the
gradient checker); parameter blobs are created float32.
"""
import numpy as np

from .blob import Blob
from .errors import CaffeError, LayerError

LAYER_REGISTRY = {}


def register_layer(type_name, cls=None):
    """Register a Layer subclass under its prototxt ``type`` string.

    Usable as a decorator (``@register_layer("ReLU")``) or directly
    (``register_layer("MyLayer", MyLayer)``) from user code.  Registering a
    different class under a taken name is an error, as in Caffe's layer factory;
    registering the same class again (a re-imported module) is allowed.
    """

    def add(layer_cls):
        if type_name in LAYER_REGISTRY and LAYER_REGISTRY[type_name] is not layer_cls:
            raise CaffeError(f"layer type '{type_name}' is already registered")
        LAYER_REGISTRY[type_name] = layer_cls
        layer_cls.type_name = type_name
        return layer_cls

    return add if cls is None else add(cls)


def layer_class(type_name, layer_name="?"):
    """Look up a registered layer class; unknown types list the known ones."""
    try:
        return LAYER_REGISTRY[type_name]
    except KeyError:
        known = ", ".join(sorted(LAYER_REGISTRY))
        raise LayerError(layer_name, type_name,
                         f"unknown layer type '{type_name}' (known types: {known})") from None


def create_layer(layer_param, phase=None):
    """Instantiate the registered class for ``layer_param.type``."""
    return layer_class(layer_param.type, layer_param.name)(layer_param, phase)


class Layer:
    """Base class of every layer; subclasses override the pycaffe hooks.

    Class attributes declare how many bottoms/tops a layer takes (-1: no limit),
    whether it is a loss (default loss_weight 1 on top 0), and whether it has a
    backward at all (``has_backward = False`` for ArgMax, Accuracy, ...).
    """

    type_name = None
    exact_num_bottom_blobs = -1
    min_bottom_blobs = -1
    max_bottom_blobs = -1
    exact_num_top_blobs = -1
    min_top_blobs = -1
    max_top_blobs = -1
    equal_num_bottom_top_blobs = False
    auto_top_blobs = False
    is_loss = False
    has_backward = True

    def __init__(self, layer_param, phase=None):
        self.layer_param = layer_param
        self.phase = layer_param.phase if phase is None else phase
        # Caffe's Layer constructor takes blobs stored in the LayerParameter.
        self.blobs = [blob_from_proto(b) for b in layer_param.blobs]
        self.loss_weights = []
        # Set by the net: False for parameters with lr_mult 0 (Caffe's param_propagate_down_).
        self.param_propagate_down = None
        # Set by the net: False when it will never run this layer's backward (net.cpp's
        # layer_need_backward_), so forward may skip caching what only backward reads.
        self.backward_needed = True
        # Set by the net for a forward that also runs the in-place ReLU right after this
        # layer: apply max(top, 0) at the end of forward (the ReLU's forward is skipped).
        # Exact: the same maximum, one memory pass fewer.  Only where can_fold_relu().
        self.fused_relu = False

    # -- identity --------------------------------------------------------------
    @property
    def name(self):
        return self.layer_param.name

    @property
    def type(self):
        return self.layer_param.type or self.type_name

    def error(self, message):
        """A LayerError naming this layer (raise it)."""
        return LayerError(self.name, self.type, message)

    # -- lifecycle -------------------------------------------------------------
    def setup_layer(self, bottom, top):
        """Run the fixed setup sequence; do not override."""
        self.check_blob_counts(bottom, top)
        self.setup(bottom, top)
        self.reshape(bottom, top)
        self.set_loss_weights(top)

    def setup(self, bottom, top):
        """Read parameters and create ``self.blobs`` (skip creation if already present)."""

    def reshape(self, bottom, top):
        """Shape the tops (and internal buffers) from the bottoms."""
        raise NotImplementedError(f"{type(self).__name__}.reshape")

    def forward(self, bottom, top):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def can_fold_relu(self):
        """Whether this layer's forward can apply ``fused_relu`` to its single top in its last
        pass, its backward never reading that top.  Layers that can override this."""
        return False

    def backward(self, top, propagate_down, bottom):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def init_param_blobs(self, specs):
        """Create ``self.blobs`` from ``(shape, filler_param, what)`` specs, in Caffe's order.

        When blobs were preloaded (from the LayerParameter), check them instead:
        the count must match, and each shape must equal the spec's, allowing the
        legacy 4-D form of old .caffemodel files ((1, 1, N, K) weights, (1, 1, 1, N)
        biases), which Caffe's ShapeEquals accepts and which is reshaped here.
        """
        from .fillers import fill

        if not self.blobs:
            self.blobs = [fill(Blob(shape), filler) for shape, filler, _ in specs]
            return
        if len(self.blobs) != len(specs):
            raise self.error(f"expected {len(specs)} parameter blob(s), got {len(self.blobs)}")
        for blob, (shape, _, what) in zip(self.blobs, specs):
            shape = tuple(shape)
            if blob.shape == shape:
                continue
            padded = (1,) * (blob.num_axes - len(shape)) + shape
            if blob.num_axes <= 4 and blob.shape == padded:
                blob.reshape(shape)
                continue
            raise self.error(f"{what} blob has shape {blob.shape}, expected {shape}")

    def param_needs_gradient(self, index):
        """Whether backward should compute parameter ``index``'s gradient (False when frozen)."""
        flags = self.param_propagate_down
        return flags is None or index >= len(flags) or bool(flags[index])

    def allow_force_backward(self, bottom_index):
        """Whether ``force_backward`` may ask for bottom ``bottom_index``'s gradient."""
        return True

    # -- checks ----------------------------------------------------------------
    def check_blob_counts(self, bottom, top):
        nb, nt = len(bottom), len(top)

        def need(cond, what):
            if not cond:
                raise self.error(what)

        if self.exact_num_bottom_blobs >= 0:
            need(nb == self.exact_num_bottom_blobs,
                 f"takes {self.exact_num_bottom_blobs} bottom blob(s) as input, got {nb}")
        if self.min_bottom_blobs >= 0:
            need(nb >= self.min_bottom_blobs, f"takes at least {self.min_bottom_blobs} bottom blob(s) as input, got {nb}")
        if self.max_bottom_blobs >= 0:
            need(nb <= self.max_bottom_blobs, f"takes at most {self.max_bottom_blobs} bottom blob(s) as input, got {nb}")
        if self.exact_num_top_blobs >= 0:
            need(nt == self.exact_num_top_blobs,
                 f"produces {self.exact_num_top_blobs} top blob(s) as output, got {nt}")
        if self.min_top_blobs >= 0:
            need(nt >= self.min_top_blobs, f"produces at least {self.min_top_blobs} top blob(s) as output, got {nt}")
        if self.max_top_blobs >= 0:
            need(nt <= self.max_top_blobs, f"produces at most {self.max_top_blobs} top blob(s) as output, got {nt}")
        if self.equal_num_bottom_top_blobs:
            need(nb == nt, f"produces one top blob as output for each bottom blob input (got {nb} bottoms, {nt} tops)")

    def set_loss_weights(self, top):
        """Store per-top loss weights and write them into the tops' diffs (Caffe's SetLossWeights)."""
        weights = list(self.layer_param.loss_weight)
        if not weights and self.is_loss:
            weights = [1.0]
        if weights and len(weights) != len(top):
            if self.is_loss and not self.layer_param.loss_weight:
                weights += [0.0] * (len(top) - len(weights))
            else:
                raise self.error(f"loss_weight must be unspecified or specified once per top blob "
                                 f"({len(weights)} given for {len(top)} tops)")
        self.loss_weights = weights or [0.0] * len(top)
        for w, blob in zip(self.loss_weights, top):
            if w != 0:
                blob.diff[...] = w

    def loss(self, top_index):
        return self.loss_weights[top_index] if top_index < len(self.loss_weights) else 0.0

    def __repr__(self):
        return f"<{type(self).__name__} '{self.name}'>"


def blob_from_proto(proto, dtype=np.float32):
    """A Blob from a BlobProto: ``shape`` if present, else the legacy num/channels/height/width.

    Caffe files store weights in ``data`` (float) or ``double_data``.
    """
    if proto.HasField("shape"):
        shape = tuple(proto.shape.dim)
    elif proto.HasField("num") or proto.HasField("channels") or proto.HasField("height") or proto.HasField("width"):
        shape = (proto.num, proto.channels, proto.height, proto.width)
    else:
        shape = (len(proto.data) or len(proto.double_data),)
    blob = Blob(shape, dtype=dtype)
    values = proto.double_data if len(proto.double_data) else proto.data
    if len(values):
        if len(values) != blob.count:
            raise CaffeError(f"BlobProto holds {len(values)} values but its shape {shape} needs {blob.count}")
        blob.data[...] = np.asarray(values, dtype=dtype).reshape(shape)
    if len(proto.diff) == blob.count and blob.count:
        blob.diff[...] = np.asarray(proto.diff, dtype=dtype).reshape(shape)
    return blob
