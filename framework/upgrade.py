"""Upgrades of legacy Caffe definitions to the current format (Caffe's ``upgrade_proto.cpp``).

Caffe reads every net through ``UpgradeNetAsNeeded``; this module runs the same passes, in the
same order, on a ``caffe_pb2.NetParameter``:

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` (nested ``V0LayerParameter``) becomes
   ``layers { type: CONVOLUTION convolution_param { ... } }``; ``padding`` layers are removed and
   their ``pad`` folded into the convolution / pooling layer they feed.
2. Data transformation: ``scale``, ``mean_file``, ``crop_size`` and ``mirror`` inside the
   ``data_param`` / ``image_data_param`` / ``window_data_param`` of V1 data layers move into
   ``transform_param``.
3. V1 -> current: ``layers { type: ENUM }`` becomes ``layer { type: "String" }``; ``blobs_lr``,
   ``weight_decay``, ``param: "name"`` and ``blob_share_mode`` become ``param { lr_mult
   decay_mult name share_mode }``; everything else (include/exclude, loss_weight, every
   ``*_param``, the weight ``blobs``) is copied unchanged.
4. Input fields: ``input:`` with ``input_dim:`` (4 per input) or ``input_shape:`` becomes an
   ``Input`` layer named ``input`` at the front of the net.  Names alone (old ``.caffemodel``
   files) are simply dropped.
5. BatchNorm: a ``BatchNorm`` layer declaring exactly three ``param`` specs (the old way of
   freezing its statistics) gets ``lr_mult: 0`` and ``decay_mult: 0`` on all three, names kept.

Where Caffe only logs a problem and carries on (a V0 parameter that does not fit the layer type,
an unknown enum value), these functions raise :class:`framework.errors.NetError` naming the
source file and the layer: nothing is dropped silently.

Solvers: :func:`upgrade_solver` turns the legacy ``solver_type`` enum into the ``type`` string
(Caffe's ``UpgradeSolverAsNeeded``).

Files: :func:`upgrade_net_file` reads, upgrades and writes a text or binary net (the logic of
``tools/upgrade_net_proto_text.py`` and ``tools/upgrade_net_proto_binary.py``).
"""
from proto import caffe_pb2

from . import io as caffe_io
from .errors import NetError
from .logging_util import get_logger

log = get_logger("upgrade")

_V1 = caffe_pb2.V1LayerParameter

# upgrade_proto.cpp, UpgradeV0LayerType: V0 type strings -> V1 enum names.
V0_TO_V1_TYPE = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING",
    "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}

# upgrade_proto.cpp, UpgradeV1LayerType: V1 enum names -> current type strings.
V1_TO_CURRENT_TYPE = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# upgrade_proto.cpp, UpgradeSolverType: legacy SolverParameter.solver_type enum -> type string.
SOLVER_TYPE_NAMES = {
    "SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad", "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta", "ADAM": "Adam",
}

# upgrade_proto.cpp, UpgradeV0LayerParameter: where each V0LayerParameter field goes, per V0 layer
# type.  A value is "param_field.field"; the key "*" means any layer type.  A V0 field set on a
# layer type missing from its row has no home in the current format and is refused.
_DATA_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param",
                 "images": "image_data_param", "window_data": "window_data_param"}
V0_FIELD_TARGETS = {
    "num_output": {"conv": "convolution_param.num_output",
                   "innerproduct": "inner_product_param.num_output"},
    "biasterm": {"conv": "convolution_param.bias_term",
                 "innerproduct": "inner_product_param.bias_term"},
    "weight_filler": {"conv": "convolution_param.weight_filler",
                      "innerproduct": "inner_product_param.weight_filler"},
    "bias_filler": {"conv": "convolution_param.bias_filler",
                    "innerproduct": "inner_product_param.bias_filler"},
    "pad": {"conv": "convolution_param.pad", "pool": "pooling_param.pad"},
    "kernelsize": {"conv": "convolution_param.kernel_size", "pool": "pooling_param.kernel_size"},
    "group": {"conv": "convolution_param.group"},
    "stride": {"conv": "convolution_param.stride", "pool": "pooling_param.stride"},
    "pool": {"pool": "pooling_param.pool"},
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": dict({t: p + ".source" for t, p in _DATA_SOURCES.items()},
                   infogain_loss="infogain_loss_param.source"),
    "batchsize": {t: p + ".batch_size" for t, p in _DATA_SOURCES.items()},
    "scale": {"*": "transform_param.scale"},
    "meanfile": {"*": "transform_param.mean_file"},
    "cropsize": {"*": "transform_param.crop_size"},
    "mirror": {"*": "transform_param.mirror"},
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}

# upgrade_proto.cpp, NetNeedsDataUpgrade / UpgradeNetDataTransformation: V1 data layers whose
# parameter message still carries the transformation fields.
_DATA_TRANSFORM_PARAMS = {"DATA": "data_param", "IMAGE_DATA": "image_data_param",
                          "WINDOW_DATA": "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def _is_repeated(field_descriptor):
    flag = getattr(field_descriptor, "is_repeated", None)  # protobuf >= 6.31; `label` before
    return field_descriptor.label == field_descriptor.LABEL_REPEATED if flag is None else flag


def _assign(message, path, value):
    """Set ``message.<path>`` (dotted) to ``value``: append to a repeated field, copy into a
    message field, assign a scalar."""
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    fd = message.DESCRIPTOR.fields_by_name[name]
    if fd.message_type is not None:
        getattr(message, name).CopyFrom(value)
    elif _is_repeated(fd):
        getattr(message, name).append(value)
    else:
        setattr(message, name, value)


def _layer_label(layer, index):
    name = layer.name or f"#{index}"
    return f"layer '{name}'"


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def net_needs_v0_upgrade(net_param):
    """True if any ``layers`` entry nests a V0 ``layer { ... }`` (NetNeedsV0ToV1Upgrade)."""
    return any(v1.HasField("layer") for v1 in net_param.layers)


def net_needs_v1_upgrade(net_param):
    """True if the net uses the deprecated ``layers`` field at all (NetNeedsV1ToV2Upgrade)."""
    return len(net_param.layers) > 0


def net_needs_data_upgrade(net_param):
    """True if a V1 data layer keeps scale / mean_file / crop_size / mirror in its data
    parameter instead of ``transform_param`` (NetNeedsDataUpgrade)."""
    for v1 in net_param.layers:
        param_name = _DATA_TRANSFORM_PARAMS.get(_V1.LayerType.Name(v1.type))
        if param_name and v1.HasField(param_name):
            sub = getattr(v1, param_name)
            if any(sub.HasField(f) for f in _TRANSFORM_FIELDS):
                return True
    return False


def net_needs_input_upgrade(net_param):
    """True if the net declares ``input:`` fields (NetNeedsInputUpgrade)."""
    return len(net_param.input) > 0


def net_needs_batch_norm_upgrade(net_param):
    """True if a BatchNorm layer declares exactly three param specs (NetNeedsBatchNormUpgrade)
    and one of them still has a nonzero ``lr_mult`` or ``decay_mult`` (both default to 1).

    Caffe's check stops at the count, so it keeps reporting an already upgraded net; the
    upgrade itself is the same (and idempotent)."""
    return any(layer.type == "BatchNorm" and len(layer.param) == 3
               and any(spec.lr_mult != 0 or spec.decay_mult != 0 for spec in layer.param)
               for layer in net_param.layer)


def net_needs_upgrade(net_param):
    """Return True if ``net_param`` uses any legacy format that :func:`upgrade_net` rewrites.

    That is: V0 nested layers, V1 ``layers``, data-transformation fields inside V1 data
    parameters, ``input:`` header fields, or BatchNorm layers with three param specs (the checks
    of Caffe's ``NetNeedsUpgrade``).
    """
    return (net_needs_v0_upgrade(net_param) or net_needs_v1_upgrade(net_param)
            or net_needs_data_upgrade(net_param) or net_needs_input_upgrade(net_param)
            or net_needs_batch_norm_upgrade(net_param))


# ---------------------------------------------------------------------------------------------
# V0 -> V1
# ---------------------------------------------------------------------------------------------

def fold_v0_padding_layers(net_param, source="<net>"):
    """Remove V0 ``padding`` layers, moving their ``pad`` into the layer they feed.

    Returns a new NetParameter (the input is left alone).  As in Caffe's
    ``UpgradeV0PaddingLayers``, a padding layer may only feed a ``conv`` or ``pool`` layer with
    one bottom, and must itself have one bottom and one top; the consumer's bottom is rewired to
    the padding layer's bottom.
    """
    result = caffe_pb2.NetParameter()
    result.CopyFrom(net_param)
    del result.layers[:]
    last_producer = {name: -1 for name in net_param.input}  # blob -> index of its last producer
    for i, connection in enumerate(net_param.layers):
        v0 = connection.layer
        if v0.type != "padding":
            result.layers.add().CopyFrom(connection)
        for j, blob in enumerate(connection.bottom):
            if blob not in last_producer:
                raise NetError(f"{source}: V0 {_layer_label(v0, i)}: unknown bottom blob "
                               f"'{blob}' (bottom index {j})")
            producer_index = last_producer[blob]
            if producer_index < 0:
                continue
            producer = net_param.layers[producer_index]
            if producer.layer.type != "padding":
                continue
            where = f"{source}: V0 {_layer_label(v0, i)}"
            if v0.type not in ("conv", "pool"):
                raise NetError(f"{where}: a padding layer ('{producer.layer.name}') feeds a layer "
                               f"of type '{v0.type}'; only conv and pool layers can absorb it")
            if len(connection.bottom) != 1:
                raise NetError(f"{where}: a layer fed by a padding layer must have exactly one "
                               f"bottom (got {len(connection.bottom)})")
            if len(producer.bottom) != 1 or len(producer.top) != 1:
                raise NetError(f"{source}: V0 padding layer '{producer.layer.name}' must have one "
                               f"bottom and one top (got {len(producer.bottom)} and "
                               f"{len(producer.top)})")
            folded = result.layers[-1]
            folded.layer.pad = producer.layer.pad
            folded.bottom[j] = producer.bottom[0]
        for blob in connection.top:
            last_producer[blob] = i
    return result


def upgrade_v0_layer(connection, source="<net>", index=0):
    """Turn one V0 layer connection (``layers { bottom top layer { ... } }``) into a
    ``V1LayerParameter`` with an enum type and typed ``*_param`` messages (UpgradeV0LayerParameter).
    """
    v1 = caffe_pb2.V1LayerParameter()
    v1.bottom.extend(connection.bottom)
    v1.top.extend(connection.top)
    if not connection.HasField("layer"):
        return v1
    v0 = connection.layer
    where = f"{source}: V0 {_layer_label(v0, index)} (type '{v0.type}')"
    if v0.HasField("name"):
        v1.name = v0.name
    if v0.HasField("type"):
        if v0.type not in V0_TO_V1_TYPE:
            raise NetError(f"{where}: unknown V0 layer type '{v0.type}' (known: "
                           f"{', '.join(sorted(V0_TO_V1_TYPE))})")
        v1.type = _V1.LayerType.Value(V0_TO_V1_TYPE[v0.type])
    for fd, value in v0.ListFields():
        name = fd.name
        if name in ("name", "type"):
            continue
        if name in ("blobs", "blobs_lr", "weight_decay"):
            getattr(v1, name).extend(value)
            continue
        targets = V0_FIELD_TARGETS.get(name)
        if targets is None:
            raise NetError(f"{where}: V0 parameter '{name}' has no equivalent in the current "
                           f"format")
        target = targets.get(v0.type, targets.get("*"))
        if target is None:
            raise NetError(f"{where}: V0 parameter '{name}' is not valid for this layer type "
                           f"(valid for: {', '.join(sorted(targets))})")
        if name == "pool":  # the two PoolMethod enums share names (MAX, AVE, STOCHASTIC)
            value = caffe_pb2.PoolingParameter.PoolMethod.Value(
                caffe_pb2.V0LayerParameter.PoolMethod.Name(value))
        _assign(v1, target, value)
    return v1


def upgrade_v0_net(net_param, source="<net>"):
    """Upgrade a V0 net in place to V1 ``layers`` (padding folded, parameters typed).

    Caffe's ``UpgradeV0Net`` rebuilds the net from its name, inputs and ``force_backward``
    only; here every other net-level field is kept as well (a V0 file has no others).
    """
    padded = fold_v0_padding_layers(net_param, source)
    upgraded = [upgrade_v0_layer(c, source, i) for i, c in enumerate(padded.layers)]
    del net_param.layers[:]
    for v1 in upgraded:
        net_param.layers.add().CopyFrom(v1)
    return net_param


# ---------------------------------------------------------------------------------------------
# Data transformation fields
# ---------------------------------------------------------------------------------------------

def upgrade_data_transformation(net_param):
    """Move scale / mean_file / crop_size / mirror from the ``data_param``,
    ``image_data_param`` or ``window_data_param`` of V1 data layers into their
    ``transform_param``, in place (UpgradeNetDataTransformation).  A value already in
    ``transform_param`` is overwritten, as in Caffe."""
    for v1 in net_param.layers:
        param_name = _DATA_TRANSFORM_PARAMS.get(_V1.LayerType.Name(v1.type))
        if not param_name or not v1.HasField(param_name):
            continue
        sub = getattr(v1, param_name)
        for field in _TRANSFORM_FIELDS:
            if sub.HasField(field):
                setattr(v1.transform_param, field, getattr(sub, field))
                sub.ClearField(field)
    return net_param


# ---------------------------------------------------------------------------------------------
# V1 -> current
# ---------------------------------------------------------------------------------------------

def _param_spec(layer, i):
    while len(layer.param) <= i:
        layer.param.add()
    return layer.param[i]


def upgrade_v1_layer(v1, source="<net>", index=0):
    """Turn one ``V1LayerParameter`` into a current ``LayerParameter`` (UpgradeV1LayerParameter).

    Type enum -> type string; ``param`` names, ``blob_share_mode``, ``blobs_lr`` and
    ``weight_decay`` -> ``param { name share_mode lr_mult decay_mult }`` (index by index);
    bottoms, tops, name, include/exclude, loss_weight, blobs and every ``*_param`` are copied.
    """
    layer = caffe_pb2.LayerParameter()
    where = f"{source}: V1 {_layer_label(v1, index)}"
    for fd, value in v1.ListFields():
        name = fd.name
        if name in ("bottom", "top", "loss_weight"):
            getattr(layer, name).extend(value)
        elif name == "name":
            layer.name = value
        elif name in ("include", "exclude", "blobs"):
            for item in value:
                getattr(layer, name).add().CopyFrom(item)
        elif name == "type":
            enum_name = _V1.LayerType.Name(value)
            if enum_name not in V1_TO_CURRENT_TYPE:
                raise NetError(f"{where}: unknown V1 layer type {enum_name}")
            layer.type = V1_TO_CURRENT_TYPE[enum_name]
        elif name == "param":
            for i, param_name in enumerate(value):
                _param_spec(layer, i).name = param_name
        elif name == "blob_share_mode":
            for i, mode in enumerate(value):
                _param_spec(layer, i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(
                    _V1.DimCheckMode.Name(mode))
        elif name == "blobs_lr":
            for i, lr in enumerate(value):
                _param_spec(layer, i).lr_mult = lr
        elif name == "weight_decay":
            for i, decay in enumerate(value):
                _param_spec(layer, i).decay_mult = decay
        elif name.endswith("_param") and name in layer.DESCRIPTOR.fields_by_name:
            getattr(layer, name).CopyFrom(value)
        elif name == "layer":
            raise NetError(f"{where}: still holds a V0 'layer' definition after the V0 upgrade")
        else:
            raise NetError(f"{where}: V1 field '{name}' has no equivalent in the current format")
    return layer


def upgrade_v1_net(net_param, source="<net>"):
    """Upgrade V1 ``layers`` in place to current ``layer`` entries (UpgradeV1Net).

    Refuses a net that has both ``layer`` and ``layers``, as Caffe does.
    """
    _refuse_mixed_layer_fields(net_param, source)
    upgraded = [upgrade_v1_layer(v1, source, i) for i, v1 in enumerate(net_param.layers)]
    del net_param.layers[:]
    del net_param.layer[:]
    for layer in upgraded:
        net_param.layer.add().CopyFrom(layer)
    return net_param


def _refuse_mixed_layer_fields(net_param, source):
    # upgrade_proto.cpp, UpgradeV1Net: LOG(FATAL) on a definition with both fields.
    if len(net_param.layer) and len(net_param.layers):
        raise NetError(
            f"{source}: refusing to upgrade an inconsistent NetParameter: the definition has "
            f"both layer and layers fields ({len(net_param.layer)} 'layer', "
            f"{len(net_param.layers)} 'layers'). The current format writes "
            f"layer {{ type: 'Layer' ... }}, not layers {{ type: LAYER ... }}; switch the whole "
            f"definition to 'layer' to continue.")


# ---------------------------------------------------------------------------------------------
# Input fields -> Input layer
# ---------------------------------------------------------------------------------------------

def upgrade_input(net_param, source="<net>"):
    """Replace the ``input:`` / ``input_dim:`` / ``input_shape:`` header by an ``Input`` layer
    named ``input`` at the front of the net, in place (UpgradeNetInput).

    ``input_dim`` gives 4 dims per input (N, C, H, W); ``input_shape`` one BlobShape per input.
    Input names without any dims (old ``.caffemodel`` files) are just removed.
    """
    names = list(net_param.input)
    n_dims, n_shapes = len(net_param.input_dim), len(net_param.input_shape)
    if n_dims and n_shapes:
        raise NetError(f"{source}: input shapes must be given either by input_shape or by "
                       f"input_dim, not both ({n_shapes} input_shape, {n_dims} input_dim)")
    if n_shapes and n_shapes != len(names):
        raise NetError(f"{source}: {len(names)} input(s) {names} but {n_shapes} input_shape "
                       f"entries; give exactly one input_shape per input")
    if n_dims and n_dims != 4 * len(names):
        raise NetError(f"{source}: {len(names)} input(s) {names} need {4 * len(names)} "
                       f"input_dim values (4 per input), got {n_dims}")
    if n_dims or n_shapes:
        layer = caffe_pb2.LayerParameter(name="input", type="Input", top=names)
        for i in range(len(names)):
            shape = layer.input_param.shape.add()
            if n_shapes:
                shape.CopyFrom(net_param.input_shape[i])
            else:
                shape.dim.extend(net_param.input_dim[4 * i:4 * i + 4])
        existing = [caffe_pb2.LayerParameter() for _ in net_param.layer]
        for copy, original in zip(existing, net_param.layer):
            copy.CopyFrom(original)
        del net_param.layer[:]
        net_param.layer.add().CopyFrom(layer)
        for copy in existing:
            net_param.layer.add().CopyFrom(copy)
    net_param.ClearField("input")
    net_param.ClearField("input_dim")
    net_param.ClearField("input_shape")
    return net_param


# ---------------------------------------------------------------------------------------------
# BatchNorm param specs
# ---------------------------------------------------------------------------------------------

def upgrade_batch_norm(net_param):
    """Zero ``lr_mult`` and ``decay_mult`` of BatchNorm layers that declare exactly three param
    specs, keeping every other ParamSpec field (names for sharing), in place
    (UpgradeNetBatchNorm).  The statistics blobs are not learnable parameters."""
    for layer in net_param.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
    return net_param


# ---------------------------------------------------------------------------------------------
# Whole net / solver
# ---------------------------------------------------------------------------------------------

def upgrade_net(net_param, source="<net>"):
    """Upgrade a ``caffe_pb2.NetParameter`` from any legacy format to the current one, in place,
    and return it.

    Runs Caffe's ``UpgradeNetAsNeeded`` passes in order: V0 -> V1, data transformation
    fields, V1 -> current, input fields -> ``Input`` layer, BatchNorm param specs.  A current
    net comes back unchanged.  ``source`` (the file name) is used in error messages.

    Raises NetError for a definition with both ``layer`` and ``layers``, an unknown layer type,
    a V0 parameter that does not fit its layer, misplaced padding layers or inconsistent input
    dimensions.
    """
    _refuse_mixed_layer_fields(net_param, source)
    if net_needs_v0_upgrade(net_param):
        log.info("Upgrading V0LayerParameter definitions in %s", source)
        upgrade_v0_net(net_param, source)
    if net_needs_data_upgrade(net_param):
        log.info("Upgrading deprecated data transformation parameters in %s", source)
        upgrade_data_transformation(net_param)
    if net_needs_v1_upgrade(net_param):
        log.info("Upgrading V1LayerParameter definitions in %s", source)
        upgrade_v1_net(net_param, source)
    if net_needs_input_upgrade(net_param):
        log.info("Upgrading deprecated input fields in %s", source)
        upgrade_input(net_param, source)
    if net_needs_batch_norm_upgrade(net_param):
        log.info("Upgrading BatchNorm layers with deprecated param specs in %s", source)
        upgrade_batch_norm(net_param)
    return net_param


def solver_needs_upgrade(solver_param):
    """True if the solver uses the legacy ``solver_type`` enum (SolverNeedsTypeUpgrade)."""
    return solver_param.HasField("solver_type")


def upgrade_solver(solver_param, source="<solver>", upgrade_nets=True):
    """Upgrade a ``caffe_pb2.SolverParameter`` in place and return it.

    The legacy ``solver_type`` enum (SGD, NESTEROV, ADAGRAD, RMSPROP, ADADELTA, ADAM) becomes
    the ``type`` string ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam") and is
    cleared.  As in Caffe's ``UpgradeSolverType``, a file that sets both ``solver_type`` and
    ``type`` is refused (NetError), even when they agree.

    With ``upgrade_nets`` (default True) the nets written inline in the solver
    (``net_param``, ``train_net_param``, each ``test_net_param``) are upgraded with
    :func:`upgrade_net` too.  Caffe itself does not upgrade inline nets (its Solver copies them
    as they are), which would leave a V1 inline net with no layers at all.
    """
    if solver_param.HasField("solver_type"):
        enum_name = caffe_pb2.SolverParameter.SolverType.Name(solver_param.solver_type)
        if solver_param.HasField("type"):
            raise NetError(
                f"{source}: failed to upgrade solver: the old solver_type field (enum, "
                f"{enum_name}) and the new type field (string, '{solver_param.type}') cannot "
                f"both be specified")
        log.info("Upgrading deprecated solver_type %s in %s", enum_name, source)
        solver_param.type = SOLVER_TYPE_NAMES[enum_name]
        solver_param.ClearField("solver_type")
    if upgrade_nets:
        for field in ("net_param", "train_net_param"):
            if solver_param.HasField(field):
                upgrade_net(getattr(solver_param, field), f"{source} ({field})")
        for i, test_net in enumerate(solver_param.test_net_param):
            upgrade_net(test_net, f"{source} (test_net_param #{i})")
    return solver_param


# ---------------------------------------------------------------------------------------------
# Files (the logic behind tools/upgrade_net_proto_text.py and upgrade_net_proto_binary.py)
# ---------------------------------------------------------------------------------------------

def upgrade_net_file(src, dst, binary=False):
    """Read the net in ``src``, upgrade it with :func:`upgrade_net` and write it to ``dst`` in
    the same encoding (text via ``text_format``, or binary), atomically.

    Returns True if the file needed an upgrade.  A current file is written unchanged, as
    Caffe's ``upgrade_net_proto_text`` / ``upgrade_net_proto_binary`` tools do.
    """
    if binary:
        net_param = caffe_io.read_binary_proto(src, caffe_pb2.NetParameter)
    else:
        net_param = caffe_io.read_net_param(src)
    needed = net_needs_upgrade(net_param)
    if needed:
        upgrade_net(net_param, source=src)
    else:
        log.warning("File already in latest proto format: %s", src)
    if binary:
        caffe_io.write_binary_proto(dst, net_param)
    else:
        caffe_io.write_prototxt(dst, net_param)
    return needed


def upgrade_tool_main(argv, binary):
    """The body of tools/upgrade_net_proto_{text,binary}.py; returns the exit status.

    0 on success, 1 if the upgrade failed, 2 if the input could not be read or
    parsed or the output could not be written.
    """
    import argparse

    from .errors import CaffeError
    from .logging_util import init_logging

    kind = "binary (.caffemodel)" if binary else "text (.prototxt)"
    parser = argparse.ArgumentParser(
        description=f"Upgrade a {kind} NetParameter to the current Caffe format, as Caffe's "
                    f"upgrade_net_proto_{'binary' if binary else 'text'} does.")
    parser.add_argument("input", help=f"{kind} net to upgrade")
    parser.add_argument("output", help=f"where to write the upgraded {kind} net")
    args = parser.parse_args(argv)
    init_logging()
    try:
        upgrade_net_file(args.input, args.output, binary=binary)
    except NetError as e:
        log.error("%s", e)
        return 1
    except (CaffeError, OSError) as e:
        log.error("%s", e)
        return 2
    log.info("Wrote upgraded NetParameter %s proto to %s", "binary" if binary else "text", args.output)
    return 0
