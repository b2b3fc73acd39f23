"""Loss layers and Accuracy, with Caffe's exact normalisations.

Every loss layer outputs a 0-axis blob (shape ``()``), gets ``loss_weight`` 1
on its first top by default (``is_loss``) and scales its backward by
``top[0].diff`` (where the net stores the loss weight).  Labels never receive
gradients: asking for one raises, as Caffe's ``LOG(FATAL)`` does.

Shared pieces: ``normalization_mode`` (which ``LossParameter`` mode applies)
and ``loss_normalizer`` (Caffe's get_normalizer, with its max(1, .) guard).
"""
import numpy as np
from google.protobuf.message import DecodeError

from framework.blob import Blob
from framework.errors import CaffeError
from framework.layer import Layer, blob_from_proto, register_layer
from proto import caffe_pb2

from .softmax import softmax, softmax_axis

_Loss = caffe_pb2.LossParameter
FULL, VALID, BATCH_SIZE, NONE = _Loss.FULL, _Loss.VALID, _Loss.BATCH_SIZE, _Loss.NONE

# softmax_loss_layer.cpp clamps probabilities at FLT_MIN before the log;
# loss_layer.hpp's kLOG_THRESHOLD (1e-20) is used by InfogainLoss and
# MultinomialLogisticLoss.
FLT_MIN = float(np.finfo(np.float32).tiny)
LOG_THRESHOLD = 1e-20


# -- normalisation ----------------------------------------------------------------
def normalization_mode(loss_param, default):
    """The NormalizationMode a loss layer uses.

    An explicit ``normalization`` wins; otherwise the legacy ``normalize``
    flag maps true -> VALID, false -> BATCH_SIZE; otherwise ``default``
    (VALID for SoftmaxWithLoss, BATCH_SIZE for SigmoidCrossEntropyLoss).
    """
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return VALID if loss_param.normalize else BATCH_SIZE
    return default


def loss_normalizer(mode, outer_num, inner_num, valid_count=-1):
    """Caffe's get_normalizer: the divisor of a summed loss.

    FULL: outer*inner; VALID: the number of non-ignored labels (outer*inner
    when ``valid_count`` is -1); BATCH_SIZE: outer; NONE: 1.  The result is at
    least 1, so a batch whose labels are all ignored gives loss 0, not NaN
    (loss_layer.cpp).
    """
    if mode == FULL:
        normalizer = outer_num * inner_num
    elif mode == VALID:
        normalizer = outer_num * inner_num if valid_count == -1 else valid_count
    elif mode == BATCH_SIZE:
        normalizer = outer_num
    elif mode == NONE:
        normalizer = 1
    else:
        raise CaffeError(f"unknown loss normalization mode {mode}")
    return max(1.0, float(normalizer))


# -- labels -----------------------------------------------------------------------
def class_labels(layer, label_blob, shape, num_classes, ignore_label=None):
    """Integer labels (truncated like Caffe's static_cast<int>) reshaped to ``shape``.

    Returns ``(labels, valid)``: ``valid`` is False where the label equals
    ``ignore_label``.  A valid label outside [0, num_classes) raises a
    LayerError naming the layer, the position and the value.
    """
    raw = label_blob.data.reshape(shape)
    labels = raw.astype(np.int64)
    valid = np.ones(shape, dtype=bool) if ignore_label is None else labels != ignore_label
    bad = valid & ((labels < 0) | (labels >= num_classes) | ~np.isfinite(raw))
    if bad.any():
        where = int(np.flatnonzero(bad)[0])
        value = raw.reshape(-1)[where]
        raise layer.error(f"label value {value:g} (label index {where}) is outside the valid range "
                          f"[0, {num_classes}) of class indices")
    return labels, valid


def _ignore_label(loss_param):
    return loss_param.ignore_label if loss_param.HasField("ignore_label") else None


class LossLayer(Layer):
    """Base of the loss layers (Caffe's LossLayer).

    Two bottoms (data, label) and one top by default; the top is a scalar of
    shape ``()``.  bottom[0] and bottom[1] must have the same first dimension.
    Force-backward never reaches bottom 1 (the labels).
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1
    is_loss = True
    label_bottoms = (1,)

    def reshape(self, bottom, top):
        # loss_layer.cpp: the same first dimension for data and labels
        if bottom[0].num_axes and bottom[1].num_axes and bottom[0].shape[0] != bottom[1].shape[0]:
            raise self.error(f"The data and label should have the same first dimension "
                             f"(bottom[0] {bottom[0].shape}, bottom[1] {bottom[1].shape})")
        top[0].reshape(())

    def allow_force_backward(self, bottom_index):
        return bottom_index not in self.label_bottoms

    def refuse_label_gradients(self, propagate_down):
        """Raise if backward is asked for a label bottom (Caffe: LOG(FATAL))."""
        for i in self.label_bottoms:
            if i < len(propagate_down) and propagate_down[i]:
                raise self.error(f"cannot backpropagate to label inputs (bottom {i})")

    def refuse_loss_param(self):
        """For layers whose Caffe code reads no LossParameter field: refuse them rather than ignore them."""
        lp = self.layer_param.loss_param
        for field in ("ignore_label", "normalization", "normalize"):
            if lp.HasField(field):
                raise self.error(f"loss_param.{field} is not supported by {self.type} "
                                 f"(Caffe ignores it); got {getattr(lp, field)}")

    def refuse_second_top_weight(self):
        """The probability top of SoftmaxWithLoss/InfogainLoss gets no gradient: refuse a loss weight on it."""
        weights = list(self.layer_param.loss_weight)
        if len(weights) > 1 and any(w != 0 for w in weights[1:]):
            raise self.error(f"loss_weight on the probability top (top 1) must be 0, got {weights[1]}: "
                             f"{self.type} does not backpropagate through it")

    @staticmethod
    def loss_weight(top):
        return top[0].diff[()]


# -- softmax-based losses ------------------------------------------------------------
class _SoftmaxLossBase(LossLayer):
    """Shared plumbing of SoftmaxWithLoss and InfogainLoss: softmax over an axis,
    one label per (outer, inner) position, optional second top with the probabilities."""

    exact_num_top_blobs = -1
    min_top_blobs = 1
    max_top_blobs = 2
    axis_field = "softmax_param.axis"

    def setup(self, bottom, top):
        self.ignore_label = _ignore_label(self.layer_param.loss_param)
        self.prob = Blob(bottom[0].shape, dtype=bottom[0].dtype)
        self.refuse_second_top_weight()

    def axis_param(self):
        return self.layer_param.softmax_param.axis

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        x = bottom[0]
        self.axis = softmax_axis(self, x, self.axis_param(), self.axis_field)
        self.outer_num = x.count_range(0, self.axis)
        self.inner_num = x.count_range(self.axis + 1)
        self.num_classes = x.shape[self.axis]
        if self.outer_num * self.inner_num != bottom[1].count:
            raise self.error(
                f"Number of labels must match number of predictions; e.g., if {self.axis_field} == 1 and "
                f"prediction shape is (N, C, H, W), label count (number of labels) must be N*H*W, with "
                f"integer values in {{0, 1, ..., C-1}} (predictions {x.shape}, {bottom[1].count} labels)")
        if self.prob.dtype != x.dtype:
            self.prob = Blob(x.shape, dtype=x.dtype)
        self.prob.reshape(x.shape)
        if len(top) >= 2:
            top[1].reshape(x.shape)

    def forward_probabilities(self, bottom, top):
        """Softmax into ``self.prob``; returns (prob as (outer, C, inner), labels, valid)."""
        softmax(bottom[0].data, self.axis, out=self.prob.data)
        shape = (self.outer_num, self.inner_num)
        labels, valid = class_labels(self, bottom[1], shape, self.num_classes, self.ignore_label)
        if len(top) == 2:
            top[1].share_data(self.prob)  # softmax_loss_layer.cpp: top[1]->ShareData(prob_)
        return self.prob.data.reshape(self.outer_num, self.num_classes, self.inner_num), labels, valid


@register_layer("SoftmaxWithLoss")
class SoftmaxWithLossLayer(_SoftmaxLossBase):
    """Multinomial logistic loss of a softmax: L = -sum log p[label] / normalizer.

    bottoms: scores x (softmax over ``softmax_param.axis``, default 1) and
    labels, one per (outer, inner) position, integers in [0, C).
    tops: the loss (shape ()), optionally the probabilities (x's shape).
    ``loss_param``: ``ignore_label`` (skipped positions), ``normalization``
    (default VALID: divide by the number of non-ignored labels) or the legacy
    ``normalize``.  p is clamped at FLT_MIN before the log.
    Backward: dx = (p - onehot(label)) * loss_weight / normalizer, 0 at ignored
    positions.
    """

    def setup(self, bottom, top):
        super().setup(bottom, top)
        self.normalization = normalization_mode(self.layer_param.loss_param, VALID)

    def forward(self, bottom, top):
        prob, labels, valid = self.forward_probabilities(bottom, top)
        picked = np.take_along_axis(prob, np.where(valid, labels, 0)[:, None, :], axis=1)[:, 0, :]
        loss = -np.sum(np.log(np.maximum(picked[valid], FLT_MIN)))
        self.labels, self.valid = labels, valid
        self.normalizer = loss_normalizer(self.normalization, self.outer_num, self.inner_num,
                                          int(valid.sum()))
        top[0].data[...] = loss / self.normalizer

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_gradients(propagate_down)
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        np.copyto(diff, self.prob.data)
        d3 = diff.reshape(self.outer_num, self.num_classes, self.inner_num)
        outer, inner = np.nonzero(self.valid)
        d3[outer, self.labels[outer, inner], inner] -= 1
        d3 *= self.valid[:, None, :]
        diff *= self.loss_weight(top) / self.normalizer


@register_layer("InfogainLoss")
class InfogainLossLayer(_SoftmaxLossBase):
    """Infogain loss: L = -sum_positions sum_l H[label, l] log p_l / normalizer.

    p is the softmax of bottom[0] over ``infogain_loss_param.axis`` (default 1):
    this layer takes scores, not probabilities (infogain_loss_layer.cpp).
    H (C x C) is bottom[2] if given, else read from the binaryproto
    ``infogain_loss_param.source``.  ``loss_param``: ``ignore_label``,
    ``normalization`` (default VALID); the legacy ``normalize`` is refused,
    as Caffe does.  p is clamped at 1e-20 before the log.
    Backward: dx_k = (p_k * sum_l H[label, l] - H[label, k]) * loss_weight / normalizer.
    No gradient to the labels or to H.
    """

    exact_num_bottom_blobs = -1
    min_bottom_blobs = 2
    max_bottom_blobs = 3
    label_bottoms = (1, 2)
    axis_field = "infogain_loss_param.axis"

    def setup(self, bottom, top):
        super().setup(bottom, top)
        lp = self.layer_param.loss_param
        if lp.HasField("normalize"):
            raise self.error('normalize is deprecated. use "normalization"')
        self.normalization = lp.normalization
        self.infogain = None
        if len(bottom) < 3:
            source = self.layer_param.infogain_loss_param.source
            if not self.layer_param.infogain_loss_param.HasField("source"):
                raise self.error("Infogain matrix source must be specified "
                                 "(infogain_loss_param.source, or a third bottom)")
            proto = caffe_pb2.BlobProto()
            try:
                with open(source, "rb") as f:
                    proto.ParseFromString(f.read())
            except (OSError, DecodeError) as exc:
                raise self.error(f"cannot read infogain_loss_param.source '{source}': {exc}") from None
            self.infogain = blob_from_proto(proto, dtype=np.float64).data

    def axis_param(self):
        return self.layer_param.infogain_loss_param.axis

    def refuse_label_gradients(self, propagate_down):
        if len(propagate_down) > 2 and propagate_down[2]:
            raise self.error("cannot backpropagate to infogain inputs (bottom 2, the matrix H)")
        super().refuse_label_gradients(propagate_down)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        h = self.infogain if len(bottom) < 3 else bottom[2].data
        if h.size != self.num_classes ** 2:
            raise self.error(f"H must be {self.num_classes}x{self.num_classes} "
                             f"(got {h.size} values, shape {h.shape})")

    def matrix(self, bottom):
        h = self.infogain if len(bottom) < 3 else bottom[2].data
        return h.reshape(self.num_classes, self.num_classes).astype(bottom[0].dtype, copy=False)

    def forward(self, bottom, top):
        prob, labels, valid = self.forward_probabilities(bottom, top)
        h = self.matrix(bottom)
        # rows of H for each position's label, zeroed where ignored: (outer, inner, C)
        h_rows = h[np.where(valid, labels, 0)] * valid[..., None]
        log_p = np.log(np.maximum(prob, prob.dtype.type(LOG_THRESHOLD)))
        loss = -np.einsum("ijl,ilj->", h_rows, log_p)
        self.labels, self.valid, self.h_rows = labels, valid, h_rows
        self.normalizer = loss_normalizer(self.normalization, self.outer_num, self.inner_num,
                                          int(valid.sum()))
        top[0].data[...] = loss / self.normalizer

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_gradients(propagate_down)
        if not propagate_down[0]:
            return
        h_rows = self.h_rows  # already zero at ignored positions
        row_sums = h_rows.sum(axis=2)  # (outer, inner): sum of H's row for each label
        prob = self.prob.data.reshape(self.outer_num, self.num_classes, self.inner_num)
        d3 = bottom[0].diff.reshape(prob.shape)
        np.multiply(prob, row_sums[:, None, :], out=d3)
        d3 -= h_rows.transpose(0, 2, 1)
        d3 *= self.loss_weight(top) / self.normalizer


# -- other losses ------------------------------------------------------------------------
def _sigmoid(x):
    # sigmoid_layer.cpp: 0.5 * tanh(0.5 x) + 0.5 (stable for large |x|)
    return 0.5 * np.tanh(0.5 * x) + 0.5


@register_layer("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """Cross-entropy of sigmoid(x) against targets t in [0, 1].

    L = -sum [t log s + (1 - t) log(1 - s)] / normalizer with s = sigmoid(x),
    computed stably as x (t - [x >= 0]) - log(1 + exp(-|x|))
    (sigmoid_cross_entropy_loss_layer.cpp).  bottoms: x and t with the same
    count.  ``loss_param``: ``ignore_label`` (targets whose integer part equals
    it are skipped), ``normalization`` (default BATCH_SIZE: divide by the first
    dimension) or the legacy ``normalize``.
    Backward: dx = (s - t) * loss_weight / normalizer, 0 where ignored.
    """

    def setup(self, bottom, top):
        lp = self.layer_param.loss_param
        self.ignore_label = _ignore_label(lp)
        self.normalization = normalization_mode(lp, BATCH_SIZE)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count != bottom[1].count:
            raise self.error(f"SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count "
                             f"(bottom[0] {bottom[0].shape}, bottom[1] {bottom[1].shape})")
        self.outer_num = bottom[0].shape[0] if bottom[0].num_axes else 1
        self.inner_num = bottom[0].count_range(1)

    def forward(self, bottom, top):
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        per_element = x * (t - (x >= 0)) - np.log1p(np.exp(-np.abs(x)))
        if self.ignore_label is None:
            valid = None
            loss = -np.sum(per_element)
            count = x.size
        else:
            valid = t.astype(np.int64) != self.ignore_label
            loss = -np.sum(per_element[valid])
            count = int(valid.sum())
        self.valid = valid
        self.normalizer = loss_normalizer(self.normalization, self.outer_num, self.inner_num, count)
        top[0].data[...] = loss / self.normalizer

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_gradients(propagate_down)
        if not propagate_down[0]:
            return
        x = bottom[0].data
        diff = bottom[0].diff
        np.subtract(_sigmoid(x), bottom[1].data.reshape(x.shape), out=diff)
        if self.valid is not None:
            diff *= self.valid
        diff *= self.loss_weight(top) / self.normalizer


@register_layer("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """L = sum (a - b)^2 / (2 N), N = the first dimension.

    bottoms: a and b with the same first dimension and the same count per item.
    Backward goes to both bottoms: da = (a - b) w / N, db = -(a - b) w / N,
    w = loss_weight (euclidean_loss_layer.cpp); force_backward may reach both.
    """

    label_bottoms = ()

    def setup(self, bottom, top):
        self.refuse_loss_param()

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count_range(1) != bottom[1].count_range(1):
            raise self.error(f"Inputs must have the same dimension "
                             f"(bottom[0] {bottom[0].shape}, bottom[1] {bottom[1].shape})")

    def forward(self, bottom, top):
        a = bottom[0].data
        self.delta = np.subtract(a, bottom[1].data.reshape(a.shape))
        flat = self.delta.reshape(-1)
        top[0].data[...] = np.dot(flat, flat) / bottom[0].shape[0] / 2

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = sign * self.loss_weight(top) / bottom[i].shape[0]
                np.multiply(self.delta.reshape(bottom[i].shape), alpha, out=bottom[i].diff)


@register_layer("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge loss on scores x (N x K after flattening), labels y (N).

    m_nk = max(0, 1 + d_nk x_nk) with d = -1 for k = y_n, +1 otherwise;
    L1 (default): L = sum m / N; L2: L = sum m^2 / N (``hinge_loss_param.norm``).
    Backward: L1: dx = d sign(m) w / N; L2: dx = 2 d m w / N (hinge_loss_layer.cpp).
    """

    def setup(self, bottom, top):
        self.refuse_loss_param()
        self.norm = self.layer_param.hinge_loss_param.norm
        if self.norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"Unknown hinge_loss_param.norm {self.norm}")

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        num = bottom[0].shape[0]
        if bottom[1].count != num:
            raise self.error(f"Number of labels must match number of predictions: one label per item "
                             f"(bottom[0] {bottom[0].shape}, bottom[1] {bottom[1].shape})")

    def forward(self, bottom, top):
        num = bottom[0].shape[0]
        x = bottom[0].data.reshape(num, -1)
        labels, _ = class_labels(self, bottom[1], (num,), x.shape[1])
        rows = np.arange(num)
        margins = x.copy()
        margins[rows, labels] *= -1
        margins += 1
        np.maximum(margins, 0, out=margins)
        flat = margins.reshape(-1)
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            loss = np.sum(flat)
        else:
            loss = np.dot(flat, flat)
        self.margins, self.labels = margins, labels
        top[0].data[...] = loss / num

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_gradients(propagate_down)
        if not propagate_down[0]:
            return
        num = bottom[0].shape[0]
        grad = bottom[0].diff.reshape(self.margins.shape)
        np.copyto(grad, self.margins)
        grad[np.arange(num), self.labels] *= -1
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            np.sign(grad, out=grad)
            grad *= self.loss_weight(top) / num
        else:
            grad *= self.loss_weight(top) * 2 / num


@register_layer("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """L = -sum_n log max(p[n, y_n], 1e-20) / N on probabilities p (N x K after flattening).

    bottoms: probabilities (not scores) and one label per item.
    Backward: dp[n, y_n] = -w / (N max(p[n, y_n], 1e-20)), 0 elsewhere
    (multinomial_logistic_loss_layer.cpp, kLOG_THRESHOLD).
    """

    def setup(self, bottom, top):
        self.refuse_loss_param()

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[1].count_range(1) != 1:
            raise self.error(f"the label must hold one value per item (shape (N,) or (N, 1, 1, 1)); "
                             f"got {bottom[1].shape}")

    def forward(self, bottom, top):
        num = bottom[0].shape[0]
        p = bottom[0].data.reshape(num, -1)
        labels, _ = class_labels(self, bottom[1], (num,), p.shape[1])
        picked = np.maximum(p[np.arange(num), labels], p.dtype.type(LOG_THRESHOLD))
        self.labels, self.picked = labels, picked
        top[0].data[...] = -np.sum(np.log(picked)) / num

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_gradients(propagate_down)
        if not propagate_down[0]:
            return
        num = bottom[0].shape[0]
        diff = bottom[0].diff
        diff[...] = 0
        scale = -self.loss_weight(top) / num
        diff.reshape(num, -1)[np.arange(num), self.labels] = scale / self.picked


@register_layer("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Contrastive loss on pairs (a_n, b_n) with similarity y_n (N x C, N x C, N).

    d_n = ||a_n - b_n||; L = sum_n [y_n d_n^2 + (1 - y_n) max(m - d_n, 0)^2] / (2N),
    m = ``contrastive_loss_param.margin`` (default 1).  With ``legacy_version``
    the dissimilar term is max(m - d_n^2, 0).  y_n counts as similar when its
    integer part is non-zero.  Backward to a (sign +1) and b (sign -1),
    alpha = sign w / N: similar rows alpha (a - b); dissimilar rows, when the
    margin term is active, -alpha (m - d)/(d + 1e-4) (a - b) (legacy:
    -alpha (a - b)), else 0 (contrastive_loss_layer.cpp, including its 1e-4).
    """

    exact_num_bottom_blobs = 3
    label_bottoms = (2,)

    def setup(self, bottom, top):
        self.refuse_loss_param()
        cp = self.layer_param.contrastive_loss_param
        self.margin = cp.margin
        self.legacy = cp.legacy_version

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b, y = bottom
        # contrastive_loss_layer.cpp: a, b are N x C x 1 x 1 with the same C; y is N x 1 x 1 x 1
        if a.count_range(2) != 1 or b.count_range(2) != 1 or a.count_range(1) != b.count_range(1):
            raise self.error(f"the pair bottoms must be N x C (x 1 x 1) with the same C; "
                             f"got {a.shape} and {b.shape}")
        if y.count != a.shape[0]:
            raise self.error(f"the similarity bottom must hold one value per pair; got {y.shape} "
                             f"for {a.shape[0]} pairs")

    def forward(self, bottom, top):
        num = bottom[0].shape[0]
        a = bottom[0].data.reshape(num, -1)
        self.delta = a - bottom[1].data.reshape(num, -1)
        self.dist_sq = np.einsum("ij,ij->i", self.delta, self.delta)
        self.similar = bottom[2].data.reshape(num).astype(np.int64) != 0
        if self.legacy:
            dissimilar = np.maximum(self.margin - self.dist_sq, 0)
        else:
            dissimilar = np.maximum(self.margin - np.sqrt(self.dist_sq), 0) ** 2
        per_pair = np.where(self.similar, self.dist_sq, dissimilar)
        top[0].data[...] = np.sum(per_pair) / num / 2

    def backward(self, top, propagate_down, bottom):
        self.refuse_label_gradients(propagate_down)
        num = bottom[0].shape[0]
        dtype = self.delta.dtype.type
        for i, sign in ((0, 1.0), (1, -1.0)):
            if not propagate_down[i]:
                continue
            alpha = sign * self.loss_weight(top) / num
            if self.legacy:
                mdist = self.margin - self.dist_sq
                beta = np.full(num, -alpha, dtype=self.delta.dtype)
            else:
                dist = np.sqrt(self.dist_sq)
                mdist = self.margin - dist
                beta = -alpha * mdist / (dist + dtype(1e-4))
            coef = np.where(self.similar, alpha, np.where(mdist > 0, beta, 0))
            np.multiply(self.delta, coef[:, None], out=bottom[i].diff.reshape(self.delta.shape))


# -- Accuracy --------------------------------------------------------------------------
@register_layer("Accuracy")
class AccuracyLayer(Layer):
    """Top-k classification accuracy (no backward).

    bottoms: scores x (classes along ``accuracy_param.axis``, default 1) and
    labels, one per (outer, inner) position.  A position counts as correct
    when fewer than ``top_k`` (default 1) scores are >= the true class's score,
    the true class excluded, so ties count against it (accuracy_layer.cpp).
    ``accuracy_param.ignore_label`` positions are skipped.
    tops: accuracy (shape (), 0 when every label is ignored); optionally the
    per-class accuracy (shape (C,), 0 for classes absent from the batch).
    """

    exact_num_bottom_blobs = 2
    min_top_blobs = 1
    max_top_blobs = 2
    has_backward = False

    def setup(self, bottom, top):
        ap = self.layer_param.accuracy_param
        self.top_k = ap.top_k
        if self.top_k < 1:
            raise self.error(f"accuracy_param.top_k must be at least 1, got {self.top_k}")
        self.ignore_label = ap.ignore_label if ap.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        x, label = bottom
        if label.count == 0 or self.top_k > x.count // label.count:
            raise self.error(f"top_k must be less than or equal to the number of classes "
                             f"(accuracy_param.top_k {self.top_k}, predictions {x.shape}, "
                             f"{label.count} labels)")
        self.axis = softmax_axis(self, x, self.layer_param.accuracy_param.axis, "accuracy_param.axis")
        self.outer_num = x.count_range(0, self.axis)
        self.inner_num = x.count_range(self.axis + 1)
        self.num_classes = x.shape[self.axis]
        if self.outer_num * self.inner_num != label.count:
            raise self.error(
                f"Number of labels must match number of predictions; e.g., if label axis == 1 and "
                f"prediction shape is (N, C, H, W), label count (number of labels) must be N*H*W, with "
                f"integer values in {{0, 1, ..., C-1}} (predictions {x.shape}, {label.count} labels)")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.num_classes,))

    def forward(self, bottom, top):
        scores = bottom[0].data.reshape(self.outer_num, self.num_classes, self.inner_num)
        labels, valid = class_labels(self, bottom[1], (self.outer_num, self.inner_num),
                                     self.num_classes, self.ignore_label)
        true_score = np.take_along_axis(scores, np.where(valid, labels, 0)[:, None, :], axis=1)
        better = np.count_nonzero(scores >= true_score, axis=1) - 1  # the true class counts itself
        hit = valid & (better < self.top_k)
        count = int(valid.sum())
        top[0].data[...] = hit.sum() / count if count else 0
        if len(top) > 1:
            seen = np.bincount(labels[valid], minlength=self.num_classes)
            right = np.bincount(labels[hit], minlength=self.num_classes)
            top[1].data[...] = np.divide(right, seen, out=np.zeros(self.num_classes), where=seen > 0)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Accuracy has no backward (Caffe: NOT_IMPLEMENTED)")
