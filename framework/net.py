"""The Net: builds a layer graph from a NetParameter and runs it (Caffe's net.cpp, pycaffe's API).

Building is a chain of passes: read + upgrade -> ``filter_net`` (NetState) ->
``insert_splits`` -> create and wire layers -> set them up -> work out which
layers and blobs need backward -> collect (and share) parameters.
"""
import logging
import os
from collections import OrderedDict

import numpy as np

from proto import caffe_pb2

from . import io as caffe_io
from .blob import Blob
from .buffers import BufferPool
from .errors import CaffeError, NetError, WeightsError
from .layer import create_layer
from .net_passes import filter_net, insert_splits

log = logging.getLogger("framework.net")

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


def read_net_param(path):
    """Read a text prototxt into a NetParameter, upgrading legacy formats as Caffe does."""
    from .upgrade import net_needs_upgrade, upgrade_net

    param = caffe_io.read_prototxt(path, caffe_pb2.NetParameter)
    if net_needs_upgrade(param):
        upgrade_net(param, source=path)
    return param


def read_weights_param(path):
    """Read a binary .caffemodel (any Caffe version) into an upgraded NetParameter."""
    from .upgrade import net_needs_upgrade, upgrade_net

    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    param = caffe_io.read_binary_proto(path, caffe_pb2.NetParameter)
    if not param.layer and not param.layers:
        raise WeightsError(f"{path} holds no layers: it is not a .caffemodel weights file")
    if net_needs_upgrade(param):
        upgrade_net(param, source=path)
    return param


class Net:
    """A Caffe network, built from a prototxt path or a NetParameter.

    pycaffe-compatible construction::

        Net("deploy.prototxt", framework.TEST)
        Net("deploy.prototxt", "weights.caffemodel", framework.TEST)
        Net("deploy.prototxt", framework.TEST, weights="weights.caffemodel")
        Net(net_param)                      # phase, level, stages from net_param.state

    ``level`` and ``stages`` select layers by their NetStateRules as in Caffe.
    ``fuse_batchnorm=True`` (needs ``weights``) folds each inference BatchNorm
    (+ Scale) into the Convolution before it and drops them (framework/fuse.py).
    """

    def __init__(self, source, *args, weights=None, phase=None, level=None, stages=None,
                 fuse_batchnorm=False):
        args = list(args)
        if args and isinstance(args[0], str):
            weights = args.pop(0)
        if args:
            phase = args.pop(0)
        if args:
            raise TypeError("Net(prototxt, [weights,] phase, weights=None, level=None, stages=None)")
        if isinstance(source, caffe_pb2.NetParameter):
            param = caffe_pb2.NetParameter()
            param.CopyFrom(source)
            from .upgrade import net_needs_upgrade, upgrade_net
            if net_needs_upgrade(param):
                upgrade_net(param, source=param.name or "<NetParameter>")
            self.source = param.name or "<NetParameter>"
        else:
            param = read_net_param(os.fspath(source))
            self.source = os.fspath(source)
            # pycaffe users keep Python layer modules beside their prototxt
            from layers.python_layer import add_module_search_path
            add_module_search_path(os.path.dirname(os.path.abspath(self.source)))
            if phase is None:
                raise TypeError("Net(prototxt, phase): the phase (framework.TRAIN or framework.TEST) is required")
        if phase is not None:
            param.state.phase = phase
        if level is not None:
            param.state.level = level
        if stages:
            param.state.stage.extend(stages)
        if fuse_batchnorm:  # fold BatchNorm/Scale into convolutions first (framework/fuse.py)
            from .fuse import fuse_batchnorm as fold
            fused = fold(param, weights)
            self._init(fused.param)
            fused.load_into(self)
            return
        self._init(param)
        if weights:
            self.copy_from(weights)

    # -- construction ------------------------------------------------------------
    def _init(self, in_param):
        self.name = in_param.name
        self.phase = in_param.state.phase
        param = insert_splits(filter_net(in_param))
        self.param = param
        self.layers = []
        self.layer_names = []
        self.blobs = OrderedDict()
        self.bottom_names = OrderedDict()
        self.top_names = OrderedDict()
        # Per layer index (layer names need not be unique: net.cpp does not check, and
        # mnist_autoencoder.prototxt names two layers "loss"; the dicts above keep the last).
        self._bottom_name_lists = []
        self._top_name_lists = []
        self._bottoms = []
        self._tops = []
        self.inputs = []
        available = OrderedDict()   # blob name -> producing layer, not yet consumed
        blob_needs_backward = {}

        self._layer_need_backward = []
        self._bottom_need_backward = []
        for layer_param in param.layer:
            if not layer_param.HasField("phase"):
                layer_param.phase = self.phase
            layer = create_layer(layer_param, self.phase)
            bottoms, tops = [], []
            need_backward = False
            bottom_need = []
            if layer_param.propagate_down and len(layer_param.propagate_down) != len(layer_param.bottom):
                raise NetError(f"layer '{layer_param.name}': propagate_down must be specified either 0 or "
                               f"bottom_size ({len(layer_param.bottom)}) times")
            for j, name in enumerate(layer_param.bottom):
                if name not in self.blobs:
                    raise NetError(f"Unknown bottom blob '{name}' (layer '{layer_param.name}', bottom index {j})")
                bottoms.append(self.blobs[name])
                available.pop(name, None)
                needs = blob_needs_backward.get(name, False)
                if layer_param.propagate_down:  # net.cpp AppendBottom: an explicit value wins
                    needs = layer_param.propagate_down[j]
                bottom_need.append(needs)
                need_backward = need_backward or blob_needs_backward.get(name, False)
            top_names = list(layer_param.top)
            if layer.auto_top_blobs:
                wanted = max(layer.exact_num_top_blobs, layer.min_top_blobs)
                while len(top_names) < wanted:
                    top_names.append(f"(automatic)_{layer_param.name}_{len(top_names)}")
            for j, name in enumerate(top_names):
                if j < len(layer_param.bottom) and layer_param.bottom[j] == name:
                    tops.append(self.blobs[name])  # in-place computation
                elif name in self.blobs:
                    raise NetError(f"Top blob '{name}' produced by multiple sources "
                                   f"(layer '{layer_param.name}', top index {j})")
                else:
                    blob = Blob()
                    self.blobs[name] = blob
                    tops.append(blob)
                available[name] = layer_param.name
            if layer_param.type == "Input":
                self.inputs.extend(top_names)
            log.info("Creating Layer %s", layer_param.name)
            layer.setup_layer(bottoms, tops)
            for name, blob in zip(top_names, tops):
                log.info("Top shape: %s (%d)", " ".join(map(str, blob.shape)), blob.count)
            # which params learn: lr_mult 0 freezes one (and may spare the layer's backward)
            layer.param_propagate_down = [
                (i >= len(layer.layer_param.param) or layer.layer_param.param[i].lr_mult != 0)
                for i in range(len(layer.blobs))]
            need_backward = need_backward or any(layer.param_propagate_down)
            if not layer.has_backward:
                need_backward = False
                bottom_need = [False] * len(bottoms)
            for name in top_names:
                blob_needs_backward[name] = need_backward
            self.layers.append(layer)
            self.layer_names.append(layer_param.name)
            self.bottom_names[layer_param.name] = list(layer_param.bottom)
            self.top_names[layer_param.name] = top_names
            self._bottom_name_lists.append(list(layer_param.bottom))
            self._top_name_lists.append(top_names)
            self._bottoms.append(bottoms)
            self._tops.append(tops)
            self._layer_need_backward.append(need_backward)
            self._bottom_need_backward.append(bottom_need)

        self._prune_backward(in_param.force_backward)
        # Caffe keeps the remaining blobs in a std::set: outputs come in name order.
        self.outputs = sorted(available)
        self.output_loss_weights = {}
        for layer, tops, names in zip(self.layers, self._tops, self._top_name_lists):
            for j, name in enumerate(names):
                if layer.loss(j):
                    self.output_loss_weights[name] = self.output_loss_weights.get(name, 0.0) + layer.loss(j)
        self.data_parallel = None  # framework.data_parallel.enable_training
        self._relu_folds = self._plan_relu_folds()
        self._scale_folds = self._plan_scale_folds()
        self._residual_folds = self._plan_residual_folds()
        # last layer of each folded group (the Scale, or the ReLU folded into it) -> BatchNorm
        self._scale_fold_ends = {}
        for norm_index, scale_index in self._scale_folds.items():
            self._scale_fold_ends[scale_index] = norm_index
            if scale_index in self._relu_folds:
                self._scale_fold_ends[self._relu_folds[scale_index]] = norm_index
        self._collect_params()
        self.params = OrderedDict((name, layer.blobs) for name, layer in zip(self.layer_names, self.layers)
                                  if layer.blobs)
        log.info("Network initialization done.")

    def _plan_relu_folds(self):
        """{producer index: ReLU index} for each plain in-place ReLU that the layer just before
        it can apply in its own forward (``Layer.can_fold_relu``): the ReLU reads and writes that
        layer's only top, has slope 0 and no loss weight.  Exact: the same max(x, 0)."""
        from layers.neuron import ReLULayer  # the layers import the framework, not the reverse

        folds = {}
        for i in range(1, len(self.layers)):
            relu, producer = self.layers[i], self.layers[i - 1]
            names = self._top_name_lists[i]
            if (type(relu) is ReLULayer and relu.negative_slope == 0 and not any(relu.loss_weights)
                    and self._bottom_name_lists[i] == names and len(names) == 1
                    and self._top_name_lists[i - 1] == names and producer.can_fold_relu()
                    and not any(producer.loss_weights)):
                folds[i - 1] = i
        return folds

    def _plan_scale_folds(self):
        """{BatchNorm index: Scale index} for each in-place batch-statistics BatchNorm whose top
        the next layer, a per-channel Scale, transforms in place (``BatchNormLayer.can_fold_scale``),
        with no loss weight on either: ResNet's BatchNorm -> Scale (-> ReLU) in training, run as
        one layer in forward and backward (float32 round-off apart, the same numbers)."""
        from layers.normalization import BatchNormLayer, ScaleLayer

        folds = {}
        for i in range(len(self.layers) - 1):
            norm, scale = self.layers[i], self.layers[i + 1]
            names = self._top_name_lists[i]
            if (type(norm) is BatchNormLayer and type(scale) is ScaleLayer and len(names) == 1
                    and self._bottom_name_lists[i] == names  # so no blob keeps a diff between them
                    and self._bottom_name_lists[i + 1] == names and self._top_name_lists[i + 1] == names
                    and not any(norm.loss_weights) and not any(scale.loss_weights)
                    and norm.can_fold_scale(scale)):
                folds[i] = i + 1
        return folds

    def _plan_residual_folds(self):
        """{Convolution index: Eltwise index} for each Eltwise SUM of two bottoms with
        coefficients 1 right after a convolution (``can_fold_residual``) whose top it reads and
        no other layer reads or writes, with no loss weight on either: ResNet's joins after
        BatchNorm/Scale are folded into the convolutions (framework.fuse).  Only memory-saving
        forwards use them (``_set_folds``), where nothing outside sees the convolution's top."""
        from layers.utility import ELTWISE_SUM, EltwiseLayer

        uses = {}
        for names in self._bottom_name_lists + self._top_name_lists:
            for name in names:
                uses[name] = uses.get(name, 0) + 1
        folds = {}
        for i in range(len(self.layers) - 1):
            conv, join = self.layers[i], self.layers[i + 1]
            if not (getattr(conv, "can_fold_residual", None) and conv.can_fold_residual()):
                continue
            (name,) = self._top_name_lists[i]
            bottoms = self._bottom_name_lists[i + 1]
            if (type(join) is EltwiseLayer and join.op == ELTWISE_SUM and len(bottoms) == 2
                    and join.coeffs == [1, 1] and bottoms.count(name) == 1 and uses[name] == 2
                    and not any(conv.loss_weights) and not any(join.loss_weights)):
                folds[i] = i + 1
        return folds

    def _prune_backward(self, force_backward):
        """Drop backward where nothing below a loss needs it (net.cpp's second pass)."""
        under_loss = set()
        skip_propagate = set()
        for i in reversed(range(len(self.layers))):
            layer, names = self.layers[i], self._top_name_lists[i]
            contributes = any(layer.loss(j) or name in under_loss for j, name in enumerate(names))
            skip = all(name in skip_propagate for name in names) if names else True
            if self._layer_need_backward[i] and skip:
                self._layer_need_backward[i] = False
                self._bottom_need_backward[i] = [False] * len(self._bottoms[i])
            if not contributes:
                self._layer_need_backward[i] = False
            for j, name in enumerate(self._bottom_name_lists[i]):
                if contributes:
                    under_loss.add(name)
                else:
                    self._bottom_need_backward[i][j] = False
                if not self._bottom_need_backward[i][j]:
                    skip_propagate.add(name)
        if force_backward:
            for i, layer in enumerate(self.layers):
                if not layer.has_backward:
                    continue
                self._layer_need_backward[i] = True
                self._bottom_need_backward[i] = [
                    need or layer.allow_force_backward(j) for j, need in enumerate(self._bottom_need_backward[i])]
                layer.param_propagate_down = [True] * len(layer.blobs)
        for layer, need in zip(self.layers, self._layer_need_backward):
            layer.backward_needed = need

    def _collect_params(self):
        """Owners and sharers of parameters by ``param { name }`` (net.cpp AppendParam)."""
        self.learnable_params = []
        self.params_lr = []
        self.params_weight_decay = []
        self._param_owner = {}      # param name -> (learnable index, layer name, blob index)
        for layer, name in zip(self.layers, self.layer_names):
            specs = layer.layer_param.param
            for i, blob in enumerate(layer.blobs):
                spec = specs[i] if i < len(specs) else caffe_pb2.ParamSpec()
                pname = spec.name
                if not pname or pname not in self._param_owner:
                    index = len(self.learnable_params)
                    if pname:
                        self._param_owner[pname] = (index, name, i)
                    self.learnable_params.append(blob)
                    self.params_lr.append(spec.lr_mult)
                    self.params_weight_decay.append(spec.decay_mult)
                    continue
                index, owner_layer, owner_i = self._param_owner[pname]
                owner = self.learnable_params[index]
                permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
                if (owner.count != blob.count) if permissive else (owner.shape != blob.shape):
                    raise NetError(
                        f"Cannot share param '{pname}' owned by layer '{owner_layer}' with layer '{name}'; "
                        f"shape mismatch. Owner layer param shape is {_shape_str(owner.shape)}; "
                        f"sharing layer {'expects' if permissive else 'shape is'} {_shape_str(blob.shape)}")
                owner_spec = self.layers[self.layer_names.index(owner_layer)].layer_param.param[owner_i]
                for field, values in (("lr_mult", self.params_lr), ("decay_mult", self.params_weight_decay)):
                    if spec.HasField(field):
                        if owner_spec.HasField(field) and getattr(owner_spec, field) != getattr(spec, field):
                            raise NetError(f"Shared param '{pname}' has mismatched {field} "
                                           f"(layers '{owner_layer}' and '{name}')")
                        values[index] = getattr(spec, field)
                layer.blobs[i] = owner  # the sharer uses the owner's blob itself

    # -- running -------------------------------------------------------------------
    def _producer_index(self, blob):
        """Index of the last layer that writes ``blob`` (-1 for none)."""
        for i in range(len(self.layers) - 1, -1, -1):
            if blob in self._top_name_lists[i]:
                return i
        return -1

    def _layer_index(self, name, default):
        if name is None:
            return default
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise NetError(f"no layer named '{name}' in net '{self.name}'") from None

    def forward_from_to(self, start, end):
        """Run layers start..end inclusive; return the weighted loss of those layers."""
        release = self._release_plan(end) if self.memory_saving else None
        loss = 0.0
        folded = set()  # layers run by the one before them (_plan_*_folds)
        unwritten = set()  # tops a folded forward writes elsewhere (_plan_residual_folds)
        for i in range(start, end + 1):
            layer, bottoms, tops = self.layers[i], self._bottoms[i], self._tops[i]
            layer.reshape(bottoms, tops)
            if i not in folded:
                self._set_folds(i, end, folded, unwritten if release is not None else None)
            if release is not None:
                for top in tops:
                    if _is_released(top) and id(top) not in unwritten:
                        top.data = self._buffer_pool.take(top.shape, top.dtype)
            else:  # tops freed by memory saving or DataParallelTraining, running here again
                for top in tops:
                    if _is_released(top):
                        top.data = np.zeros(top.shape, dtype=top.dtype)
            if i not in folded:
                layer.forward(bottoms, tops)
            for weight, top in zip(layer.loss_weights, tops):
                if weight:
                    loss += weight * float(np.sum(top.data, dtype=np.float64))
                    top.diff[...] = weight
            if release is not None:
                for blob in release[i]:
                    self._buffer_pool.give(blob)
                    _release(blob)
        return loss

    def _set_folds(self, i, end, folded, unwritten=None):
        """Tell layer ``i`` which of the layers after it (up to ``end``) its forward runs, and
        add those to ``folded``: an in-place ReLU (``fused_relu``), or for a BatchNorm the Scale
        after it (``fused_scale``) and that Scale's ReLU, or, in a memory-saving forward (which
        passes the set ``unwritten``), for a convolution the Eltwise after it
        (``fused_residual``) and the Eltwise's ReLU, adding the convolution's top, which is then
        never written, to ``unwritten``."""
        layer = self.layers[i]
        relu = self._relu_folds.get(i)
        if relu is not None:
            layer.fused_relu = relu <= end
            if layer.fused_relu:
                folded.add(relu)
        scale = self._scale_folds.get(i)
        if scale is not None:
            layer.fused_scale = None
            if scale <= end:
                self.layers[scale].reshape(self._bottoms[scale], self._tops[scale])
                layer.fused_scale = self.layers[scale]
                folded.add(scale)
                self._set_folds(scale, end, folded)
        join = self._residual_folds.get(i)
        if join is not None:
            self._set_residual_fold(i, join, end, folded, unwritten)

    def _set_residual_fold(self, i, join, end, folded, unwritten):
        """``_set_folds`` for convolution ``i`` and the Eltwise ``join`` after it: folded in a
        memory-saving forward that reaches the join and does not keep the convolution's top."""
        conv, (top,) = self.layers[i], self._tops[i]
        conv.fused_residual = None
        conv.fused_relu = False
        if unwritten is None or join > end or self._top_name_lists[i][0] in self._kept_blobs(end):
            return
        bottoms, (out,) = self._bottoms[join], self._tops[join]
        self.layers[join].reshape(bottoms, [out])
        if _is_released(out):
            out.data = self._buffer_pool.take(out.shape, out.dtype)
        conv.fused_residual = (out, bottoms[1] if bottoms[0] is top else bottoms[0])
        folded.add(join)
        unwritten.add(id(top))
        relu = self._relu_folds.get(join)
        if relu is not None and relu <= end:
            conv.fused_relu = True
            folded.add(relu)

    def _backward_folded(self, i, end):
        """Run the backward of a BatchNorm -> Scale (-> ReLU) group that ends at layer ``i`` as
        one (``BatchNormLayer.backward_with_scale``) when its forward ran folded, the group lies
        within the range and all of it needs backward; return the group's first index, or None."""
        norm_index = self._scale_fold_ends.get(i)
        if norm_index is None or norm_index < end:
            return None
        scale_index = self._scale_folds[norm_index]
        norm, scale = self.layers[norm_index], self.layers[scale_index]
        relu = scale_index in self._relu_folds and scale.fused_relu
        if norm.fused_scale is not scale or i != (self._relu_folds[scale_index] if relu else scale_index):
            return None
        if not all(self._layer_need_backward[j] and self._bottom_need_backward[j][0]
                   for j in range(norm_index, i + 1)):
            return None
        norm.backward_with_scale(self._tops[scale_index], self._bottoms[norm_index], relu)
        return norm_index

    # -- memory-saving inference -----------------------------------------------------
    @property
    def memory_saving(self):
        """Opt-in inference mode: free each intermediate blob's data after its last reader.

        While on, ``forward`` drops the data array of every blob that no later
        layer reads, keeping the net's inputs and outputs, the tops of ``end``
        and the blobs asked for with ``forward(blobs=[...])``; a dropped blob
        reads as zeros (a read-only placeholder of its shape) until a layer
        writes it again, with a fresh array, on the next forward.  Peak memory
        is then the largest set of blobs alive at once instead of all of them;
        the dropped arrays are kept and handed to later tops of the same size
        (``framework.buffers``), so repeated forwards map no new memory.
        ``backward`` is refused (the data it needs is gone) and ``forward``
        must start at the first layer.  Off by default.
        """
        return getattr(self, "_memory_saving", False)

    @memory_saving.setter
    def memory_saving(self, enabled):
        self._memory_saving = bool(enabled)
        self._keep_blobs = set()
        self._buffer_pool = BufferPool()
        if not enabled:  # give dropped blobs writable (zero) arrays again
            for blob in self.blobs.values():
                if _is_released(blob):
                    blob.data = np.zeros(blob.shape, dtype=blob.dtype)

    def _kept_blobs(self, end):
        """Names of the blobs a memory-saving forward up to ``end`` keeps: the inputs, outputs,
        those asked for, and ``end``'s tops."""
        return set(self.inputs) | set(self.outputs) | self._keep_blobs | set(self._top_name_lists[end])

    def _release_plan(self, end):
        """Per layer index, the blobs whose last reader or writer (up to ``end``) it is."""
        keep = self._kept_blobs(end)
        last = {}
        for i in range(len(self.layers)):
            for blob in self._bottom_name_lists[i] + self._top_name_lists[i]:
                last[blob] = i
        plan = [[] for _ in self.layers]
        for blob, i in last.items():
            if blob not in keep and i <= end:
                plan[i].append(self.blobs[blob])
        return plan

    def backward_from_to(self, start, end):
        """Run backward for layers start down to end inclusive, where needed."""
        if self.memory_saving:
            raise NetError(f"net '{self.name}' is in memory-saving inference mode, which frees the "
                           f"data backward needs: set net.memory_saving = False and run forward again")
        i = start
        while i >= end:
            first = self._backward_folded(i, end)
            if first is not None:
                i = first - 1
                continue
            if self._layer_need_backward[i]:
                self.layers[i].backward(self._tops[i], self._bottom_need_backward[i], self._bottoms[i])
            i -= 1

    def forward(self, blobs=None, start=None, end=None, **kwargs):
        """pycaffe's forward: set inputs from keyword arrays, run, return {output: array}.

        Inputs whose shape differs from the blob's are reshaped to fit.
        ``start``/``end`` are layer names; with ``end`` the outputs are that
        layer's tops (plus ``blobs``).
        """
        for name, array in kwargs.items():
            if name not in self.blobs:
                raise NetError(f"forward() got '{name}', which is not a blob of net '{self.name}' "
                               f"(inputs: {', '.join(self.inputs)})")
            if name not in self.inputs:
                raise NetError(f"forward() got '{name}', which is not an input of net '{self.name}' "
                               f"(inputs: {', '.join(self.inputs)})")
            array = np.asarray(array)
            blob = self.blobs[name]
            if array.shape != blob.shape:
                blob.reshape(array.shape)
            blob.data[...] = array
        start_index = self._layer_index(start, 0)
        end_index = self._layer_index(end, len(self.layers) - 1)
        if self.memory_saving:
            if start_index != 0:
                raise NetError(f"net '{self.name}' is in memory-saving inference mode: forward must "
                               f"start at the first layer (got start='{start}')")
            self._keep_blobs = set(blobs or [])
        self.forward_from_to(start_index, end_index)
        names = list(self._top_name_lists[end_index]) if end is not None else list(self.outputs)
        names += [b for b in (blobs or []) if b not in names]
        return {name: self.blobs[name].data for name in names}

    def forward_loss(self):
        """Run the whole net; return the total weighted loss (Caffe's Net::Forward(&loss))."""
        return self.forward_from_to(0, len(self.layers) - 1)

    def backward(self, diffs=None, start=None, end=None, **kwargs):
        """pycaffe's backward: set output diffs from keyword arrays, run, return {input: diff}."""
        for name, array in kwargs.items():
            if name not in self.outputs:
                raise NetError(f"backward() got '{name}', which is not an output of net '{self.name}' "
                               f"(outputs: {', '.join(self.outputs)})")
            self.blobs[name].diff[...] = array
        start_index = self._layer_index(start, len(self.layers) - 1)
        end_index = self._layer_index(end, 0)
        self.backward_from_to(start_index, end_index)
        names = list(self._bottom_name_lists[end_index]) if end is not None else list(self.inputs)
        names += [b for b in (diffs or []) if b not in names]
        return {name: self.blobs[name].diff for name in names}

    def forward_backward(self):
        """Forward then backward over the whole net; return the loss (Caffe's ForwardBackward).
        With ``data_parallel`` set (framework.data_parallel.enable_training), the batch is split
        over its replicas instead."""
        if self.data_parallel is not None:
            return self.data_parallel.forward_backward()
        loss = self.forward_loss()
        self.backward_from_to(len(self.layers) - 1, 0)
        return loss

    def reshape(self):
        """Propagate input shape changes through every layer."""
        for layer, bottoms, tops in zip(self.layers, self._bottoms, self._tops):
            layer.reshape(bottoms, tops)

    def clear_param_diffs(self):
        for blob in self.learnable_params:
            blob.diff[...] = 0

    def update(self):
        """data -= diff for every learnable parameter (Caffe's Net::Update)."""
        for blob in self.learnable_params:
            np.subtract(blob.data, blob.diff, out=blob.data)

    @property
    def layer_dict(self):
        """pycaffe's Net.layer_dict: layer name -> layer, in net order (the last of duplicate names)."""
        return OrderedDict(zip(self.layer_names, self.layers))

    @property
    def layer_need_backward(self):
        return list(self._layer_need_backward)

    @property
    def bottom_need_backward(self):
        return [list(b) for b in self._bottom_need_backward]

    def set_input_arrays(self, data, labels):
        """pycaffe's Net.set_input_arrays: feed arrays to the net's first layer, a MemoryData layer."""
        if not self.layers or self.layers[0].type != "MemoryData":
            raise NetError(f"set_input_arrays needs a MemoryData layer first in net '{self.name}'")
        self.layers[0].set_input_arrays(data, labels)

    def layer_by_name(self, name):
        return self.layers[self._layer_index(name, None)]

    # -- weights -------------------------------------------------------------------
    def share_trained_layers_with(self, other):
        """Use ``other``'s parameter blobs for same-named layers (test nets share the train net's)."""
        other_layers = dict(zip(other.layer_names, other.layers))
        for name, layer in zip(self.layer_names, self.layers):
            source = other_layers.get(name)
            if source is None or not source.blobs:
                continue
            if len(source.blobs) != len(layer.blobs):
                raise NetError(f"Incompatible number of blobs for layer '{name}'")
            for j, (mine, theirs) in enumerate(zip(layer.blobs, source.blobs)):
                if mine.shape != theirs.shape:
                    raise NetError(f"Cannot share param {j} weights from layer '{name}'; shape mismatch. "
                                   f"Source param shape is {_shape_str(theirs.shape)}; "
                                   f"target param shape is {_shape_str(mine.shape)}")
                layer.blobs[j] = theirs
        self.params = OrderedDict((n, l.blobs) for n, l in zip(self.layer_names, self.layers) if l.blobs)
        self._collect_params()

    def copy_from(self, path):
        """Load weights from a .caffemodel (binary, any Caffe version) or .caffemodel.h5 file."""
        path = os.fspath(path)
        if path.endswith(".h5"):
            from .solvers.hdf5 import load_net_hdf5  # h5py only when an .h5 file is asked for
            load_net_hdf5(self, path)
            return
        self.copy_trained_layers_from(read_weights_param(path), source=path)

    def copy_trained_layers_from(self, net_param, source="<NetParameter>"):
        """Copy blobs of same-named layers, shape-checked (Caffe's CopyTrainedLayersFrom)."""
        layers = dict(zip(self.layer_names, self.layers))
        for layer_param in net_param.layer:
            target = layers.get(layer_param.name)
            if target is None:
                log.info("Ignoring source layer %s", layer_param.name)
                continue
            # net.cpp CHECKs the blob counts even when the file's layer has none.
            if len(layer_param.blobs) != len(target.blobs):
                raise WeightsError(
                    f"{source}: incompatible number of blobs for layer '{layer_param.name}': "
                    f"the file has {len(layer_param.blobs)}, the net expects {len(target.blobs)}")
            for j, (proto, blob) in enumerate(zip(layer_param.blobs, target.blobs)):
                if not _proto_shape_matches(proto, blob.shape):
                    raise WeightsError(
                        f"{source}: cannot copy param {j} weights from layer '{layer_param.name}'; "
                        f"shape mismatch. Source param shape is {_shape_str(_proto_shape(proto))}; "
                        f"target param shape is {_shape_str(blob.shape)}. To learn this layer's "
                        f"parameters from scratch rather than copying from a saved net, rename the layer.")
                blob.data[...] = caffe_io.blob_to_array(proto).reshape(blob.shape)

    def to_proto(self, write_diff=False):
        """A NetParameter holding every layer's parameters and blobs (Caffe's Net::ToProto)."""
        param = caffe_pb2.NetParameter()
        param.name = self.name
        for layer in self.layers:
            layer_param = param.layer.add()
            layer_param.CopyFrom(layer.layer_param)
            del layer_param.blobs[:]
            for blob in layer.blobs:
                caffe_io.array_to_blob_proto(blob.data, blob.diff if write_diff else None,
                                             out=layer_param.blobs.add())
        return param

    def save(self, path, write_diff=False):
        """Write the weights as a binary .caffemodel (atomically), readable by Caffe."""
        caffe_io.write_binary_proto(os.fspath(path), self.to_proto(write_diff))

    def __repr__(self):
        return f"<Net '{self.name}' ({len(self.layers)} layers, phase {caffe_pb2.Phase.Name(self.phase)})>"


#: dtype -> the 0-d zero array that every dropped blob's read-only stand-in views, so that a
#: stand-in is told apart from any array a caller set (a broadcast constant input, say)
_STAND_IN_ZEROS = {}


def _release(blob):
    """Drop a blob's data array (memory-saving mode): a read-only zero view of its shape stands in."""
    zero = _STAND_IN_ZEROS.setdefault(blob.dtype, np.zeros((), dtype=blob.dtype))
    blob.data = np.broadcast_to(zero, blob.shape)


def _is_released(blob):
    data = blob.data
    return data.base is not None and data.base is _STAND_IN_ZEROS.get(data.dtype)


def _shape_str(shape):
    count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    return f"{' '.join(map(str, shape))} ({count})"


def _proto_shape(proto):
    if proto.HasField("shape"):
        return tuple(proto.shape.dim)
    return (proto.num, proto.channels, proto.height, proto.width)


def _proto_shape_matches(proto, shape):
    """Blob::ShapeEquals: legacy 4-D protos match blobs of <= 4 axes padded with 1s in front."""
    if proto.HasField("shape"):
        return tuple(proto.shape.dim) == tuple(shape)
    if len(shape) > 4:
        return False
    legacy = (1,) * (4 - len(shape)) + tuple(shape)
    return legacy == (proto.num, proto.channels, proto.height, proto.width)


__all__ = ["Net", "TRAIN", "TEST", "read_net_param", "CaffeError"]
