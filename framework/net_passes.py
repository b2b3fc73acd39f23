"""Pure passes over a NetParameter, run before any layer is built (Caffe's net.cpp, insert_splits.cpp).

Each pass takes a NetParameter and returns a new one, so it can be tested alone:
``filter_net`` (phase / level / stage rules) then ``insert_splits`` (one Split
layer per top that feeds several consumers).
"""
from proto import caffe_pb2

from .errors import NetError


def state_meets_rule(state, rule):
    """Whether a NetState satisfies one NetStateRule (net.cpp StateMeetsRule)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    if any(stage in stages for stage in rule.not_stage):
        return False
    return True


def layer_included(layer, state):
    """A layer with include rules needs one to match; with exclude rules, none may match."""
    if layer.include and layer.exclude:
        raise NetError(f"layer '{layer.name}': specify either include rules or exclude rules; not both")
    if layer.include:
        return any(state_meets_rule(state, rule) for rule in layer.include)
    return not any(state_meets_rule(state, rule) for rule in layer.exclude)


def filter_net(net_param):
    """Keep the layers whose include/exclude rules accept ``net_param.state`` (Caffe's FilterNet)."""
    filtered = caffe_pb2.NetParameter()
    filtered.CopyFrom(net_param)
    del filtered.layer[:]
    for layer in net_param.layer:
        if layer_included(layer, net_param.state):
            filtered.layer.add().CopyFrom(layer)
    return filtered


def split_layer_name(layer_name, blob_name, top_index):
    return f"{blob_name}_{layer_name}_{top_index}_split"


def split_blob_name(layer_name, blob_name, top_index, split_index):
    return f"{blob_name}_{layer_name}_{top_index}_split_{split_index}"


def insert_splits(net_param):
    """Give every top consumed more than once its own Split layer (insert_splits.cpp).

    A top used by k consumers (a non-zero loss_weight counts as one) is fed to a
    Split layer named ``<blob>_<layer>_<i>_split`` whose tops are
    ``<blob>_<layer>_<i>_split_<j>``; the consumers read those instead.  A
    loss weight moves to the Split's first top.  Unknown bottoms raise here,
    naming the layer and bottom index.
    """
    last_top = {}            # blob name -> (layer index, top index) of its latest producer
    source_of_bottom = {}    # (layer index, bottom index) -> (layer index, top index)
    consumers = {}           # (layer index, top index) -> number of uses
    loss_weight_of = {}      # (layer index, top index) -> explicit loss weight
    layers = net_param.layer
    for i, layer in enumerate(layers):
        for j, blob in enumerate(layer.bottom):
            if blob not in last_top:
                raise NetError(f"Unknown bottom blob '{blob}' (layer '{layer.name}', bottom index {j})")
            source = last_top[blob]
            source_of_bottom[(i, j)] = source
            consumers[source] = consumers.get(source, 0) + 1
        for j, blob in enumerate(layer.top):
            last_top[blob] = (i, j)
            if j < len(layer.loss_weight) and layer.loss_weight[j]:
                loss_weight_of[(i, j)] = layer.loss_weight[j]
                consumers[(i, j)] = consumers.get((i, j), 0) + 1

    result = caffe_pb2.NetParameter()
    result.CopyFrom(net_param)
    del result.layer[:]
    next_split = {}          # (layer index, top index) -> next split index to hand out
    for i, layer in enumerate(layers):
        copy = result.layer.add()
        copy.CopyFrom(layer)
        for j, blob in enumerate(layer.bottom):
            source = source_of_bottom[(i, j)]
            if consumers.get(source, 0) > 1:
                split_index = next_split.get(source, 0)
                next_split[source] = split_index + 1
                copy.bottom[j] = split_blob_name(layers[source[0]].name, blob, source[1], split_index)
        for j, blob in enumerate(layer.top):
            count = consumers.get((i, j), 0)
            if count <= 1:
                continue
            split = result.layer.add()
            split.name = split_layer_name(layer.name, blob, j)
            split.type = "Split"
            split.bottom.append(blob)
            for k in range(count):
                split.top.append(split_blob_name(layer.name, blob, j, k))
            weight = loss_weight_of.get((i, j), 0)
            if weight:
                split.loss_weight.append(weight)
                split.loss_weight.extend([0.0] * (count - 1))
                del copy.loss_weight[:]
                next_split[(i, j)] = 1  # the Split's first top carries the loss
    return result
