"""Write the ResNet-50/101/152 net definitions of He et al., "Deep Residual Learning for Image
Recognition" (2015), in the layout of the original Caffe release (KaimingHe/deep-residual-networks).

    python tools/make_resnet.py [--out models/resnet] [--depth 50 101 152] [--no-train-val]

Writes ``ResNet-{depth}-deploy.prototxt`` for each depth and, for depth 50,
``ResNet-50-train_val.prototxt`` and ``ResNet-50-solver.prototxt``.

The architecture (bottleneck version):

    conv1 7x7/2 (64) -> BN -> Scale -> ReLU -> pool1 3x3/2 MAX
    stage 2..5: blocks of  [1x1 (c) -> 3x3 (c) -> 1x1 (4c)]  with c = 64, 128, 256, 512
                (block counts 50: 3 4 6 3; 101: 3 4 23 3; 152: 3 8 36 3);
                the first block of each stage has a projection shortcut (1x1 conv ``branch1``),
                and stages 3..5 downsample with stride 2 in ``branch1`` and ``branch2a``;
                each conv is followed by BatchNorm (``bn...``) + Scale with bias (``scale...``),
                ReLU after branch2a/2b and after the Eltwise sum
    pool5 7x7 AVE -> fc1000 -> prob (Softmax)

Naming follows the release: block ``res{stage}{letter}``; in ResNet-101/152 the many
blocks of stages 3 and 4 are named ``res3b1, res3b2, ...`` / ``res4b1 ... res4b35`` instead of
letters.  Deploy files use the old ``input:``/``input_dim:`` header and
``use_global_stats: true``; in ResNet-50 ``conv1`` has a bias, in 101/152 it has none.

The train_val file (depth 50) reads ImageNet-style LMDBs (BGR images of at least
224x224, e.g. made by ``tools/convert_imageset.py --resize_height 256 --resize_width 256``),
random 224 crops with mirroring in TRAIN and centre crops in TEST, mean_value 104/117/123; its
BatchNorm layers leave ``use_global_stats`` unset so they follow the phase (batch statistics
in TRAIN, the stored ones in TEST); convolutions use MSRA initialisation.
"""
import argparse
import os
import sys

#: Bottleneck blocks per stage (stages 2, 3, 4, 5) for each depth (the paper's Table 1).
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
#: Bottleneck width of stages 2..5; each block outputs 4x this many channels.
WIDTHS = (64, 128, 256, 512)


class Enum(str):
    """A prototxt enum value (written without quotes), e.g. ``Enum("MAX")``."""


# ----------------------------------------------------------------------------
# Layer specs: a layer is a list of (field, value) pairs; a value is a scalar, a string
# (quoted), an Enum (bare) or a nested list of pairs (a sub-message).
# ----------------------------------------------------------------------------

class _Builder:
    """Collects the layers of one ResNet variant."""

    def __init__(self, depth, train):
        self.depth = depth
        self.train = train
        self.layers = []

    def add(self, *fields):
        self.layers.append(list(fields))

    def conv(self, name, bottom, num_output, kernel, pad, stride, bias):
        param = [("num_output", num_output), ("kernel_size", kernel), ("pad", pad),
                 ("stride", stride)]
        if not bias:
            param.append(("bias_term", False))
        if self.train:
            param.append(("weight_filler", [("type", "msra")]))
            if bias:
                param.append(("bias_filler", [("type", "constant"), ("value", 0)]))
        self.add(("bottom", bottom), ("top", name), ("name", name), ("type", "Convolution"),
                 ("convolution_param", param))

    def bn_scale(self, blob, suffix):
        """BatchNorm ``bn<suffix>`` + Scale ``scale<suffix>``, both in place on ``blob``."""
        bn = [("bottom", blob), ("top", blob), ("name", "bn" + suffix), ("type", "BatchNorm")]
        if not self.train:
            bn.append(("batch_norm_param", [("use_global_stats", True)]))
        self.add(*bn)
        self.add(("bottom", blob), ("top", blob), ("name", "scale" + suffix), ("type", "Scale"),
                 ("scale_param", [("bias_term", True)]))

    def relu(self, blob, name, after_conv=True):
        # The 101/152 release lists "top" before "bottom" in the ReLUs that follow a
        # convolution (not in those after an Eltwise sum); kept for byte-identical files.
        wiring = [("bottom", blob), ("top", blob)]
        if after_conv and self.depth > 50:
            wiring.reverse()
        self.add(*wiring, ("name", name), ("type", "ReLU"))

    def conv_bn(self, prefix, branch, bottom, num_output, kernel, pad, stride, relu):
        """One ``res<prefix>_<branch>`` convolution with its BN, Scale and (optional) ReLU."""
        name = f"res{prefix}_{branch}"
        self.conv(name, bottom, num_output, kernel, pad, stride, bias=False)
        self.bn_scale(name, f"{prefix}_{branch}")
        if relu:
            self.relu(name, name + "_relu")
        return name

    def bottleneck(self, prefix, bottom, width, stride, project):
        """A bottleneck block ``res<prefix>``; returns its output blob name."""
        if project:
            shortcut = self.conv_bn(prefix, "branch1", bottom, 4 * width, 1, 0, stride, False)
        else:
            shortcut = bottom
        x = self.conv_bn(prefix, "branch2a", bottom, width, 1, 0, stride, True)
        x = self.conv_bn(prefix, "branch2b", x, width, 3, 1, 1, True)
        x = self.conv_bn(prefix, "branch2c", x, 4 * width, 1, 0, 1, False)
        out = f"res{prefix}"
        self.add(("bottom", shortcut), ("bottom", x), ("top", out), ("name", out),
                 ("type", "Eltwise"))
        self.relu(out, out + "_relu", after_conv=False)
        return out


def block_names(depth, stage, count):
    """Block suffixes of one stage: ``2a, 2b, 2c`` or, in 101/152 stages 3-4, ``3a, 3b1, 3b2...``."""
    if depth > 50 and stage in (3, 4):
        return [f"{stage}a"] + [f"{stage}b{i}" for i in range(1, count)]
    return [f"{stage}{chr(ord('a') + i)}" for i in range(count)]


def resnet_layers(depth, train=False):
    """The layer specs of ResNet-``depth`` (deploy body, or the train_val body when ``train``)."""
    if depth not in BLOCKS:
        raise ValueError(f"depth must be one of {sorted(BLOCKS)}, got {depth}")
    b = _Builder(depth, train)
    # conv1 has a bias in the released ResNet-50 only.
    b.conv("conv1", "data", 64, 7, 3, 2, bias=(depth == 50))
    b.bn_scale("conv1", "_conv1")
    b.relu("conv1", "conv1_relu")
    b.add(("bottom", "conv1"), ("top", "pool1"), ("name", "pool1"), ("type", "Pooling"),
          ("pooling_param", [("kernel_size", 3), ("stride", 2), ("pool", Enum("MAX"))]))
    x = "pool1"
    for stage, (count, width) in enumerate(zip(BLOCKS[depth], WIDTHS), start=2):
        for i, prefix in enumerate(block_names(depth, stage, count)):
            stride = 2 if (i == 0 and stage > 2) else 1
            x = b.bottleneck(prefix, x, width, stride, project=(i == 0))
    b.add(("bottom", x), ("top", "pool5"), ("name", "pool5"), ("type", "Pooling"),
          ("pooling_param", [("kernel_size", 7), ("stride", 1), ("pool", Enum("AVE"))]))
    fc = [("num_output", 1000)]
    if train:
        fc += [("weight_filler", [("type", "gaussian"), ("std", 0.01)]),
               ("bias_filler", [("type", "constant"), ("value", 0)])]
    b.add(("bottom", "pool5"), ("top", "fc1000"), ("name", "fc1000"), ("type", "InnerProduct"),
          ("inner_product_param", fc))
    return b.layers


# ----------------------------------------------------------------------------
# Text output in the release's layout (tab indentation, a blank line after each layer)
# ----------------------------------------------------------------------------

def _value_text(value):
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _fields_text(fields, depth):
    lines = []
    indent = "\t" * depth
    for key, value in fields:
        if isinstance(value, list):
            lines.append(f"{indent}{key} {{")
            lines.extend(_fields_text(value, depth + 1))
            lines.append(f"{indent}}}")
        else:
            lines.append(f"{indent}{key}: {_value_text(value)}")
    return lines


def layers_text(layers):
    """``layer { ... }`` blocks, each followed by a blank line."""
    out = []
    for fields in layers:
        out.append("layer {")
        out.extend(_fields_text(fields, 1))
        out.append("}")
        out.append("")
    return "\n".join(out) + "\n"


def deploy_text(depth):
    """The full text of ``ResNet-<depth>-deploy.prototxt``."""
    header = f'name: "ResNet-{depth}"\ninput: "data"\n'
    header += "".join(f"input_dim: {d}\n" for d in (1, 3, 224, 224)) + "\n"
    layers = resnet_layers(depth) + [
        [("bottom", "fc1000"), ("top", "prob"), ("name", "prob"), ("type", "Softmax")]]
    return header + layers_text(layers)


TRAIN_SOURCE = "examples_out/ilsvrc12_train_lmdb"
VAL_SOURCE = "examples_out/ilsvrc12_val_lmdb"
MEAN_VALUES = (104, 117, 123)  # BGR
TRAIN_BATCH, TEST_BATCH = 32, 50


def train_val_text(depth=50):
    """The full text of ``ResNet-<depth>-train_val.prototxt``."""
    def data_layer(phase, source, batch, mirror):
        transform = [("mirror", mirror), ("crop_size", 224)]
        transform += [("mean_value", v) for v in MEAN_VALUES]
        return [("top", "data"), ("top", "label"), ("name", "data"), ("type", "Data"),
                ("include", [("phase", Enum(phase))]),
                ("transform_param", transform),
                ("data_param", [("source", source), ("batch_size", batch),
                                ("backend", Enum("LMDB"))])]

    header = (f"# ResNet-{depth} for ImageNet-style training, written by tools/make_resnet.py.\n"
              "# Layer names match ResNet-%d-deploy.prototxt, so trained weights load there.\n"
              "# The LMDBs hold BGR images of at least 224x224 (e.g. resized to 256x256 by\n"
              "# tools/convert_imageset.py); paths are relative to the current directory.\n"
              f'name: "ResNet-{depth}"\n\n') % depth
    layers = [data_layer("TRAIN", TRAIN_SOURCE, TRAIN_BATCH, True),
              data_layer("TEST", VAL_SOURCE, TEST_BATCH, False)]
    layers += resnet_layers(depth, train=True)
    layers += [
        [("bottom", "fc1000"), ("bottom", "label"), ("top", "loss"), ("name", "loss"),
         ("type", "SoftmaxWithLoss")],
        [("bottom", "fc1000"), ("bottom", "label"), ("top", "accuracy"), ("name", "accuracy"),
         ("type", "Accuracy"), ("include", [("phase", Enum("TEST"))])],
        [("bottom", "fc1000"), ("bottom", "label"), ("top", "accuracy_top5"),
         ("name", "accuracy_top5"), ("type", "Accuracy"), ("include", [("phase", Enum("TEST"))]),
         ("accuracy_param", [("top_k", 5)])],
    ]
    return header + layers_text(layers)


def solver_text(depth=50, net_dir="models/resnet"):
    """The full text of ``ResNet-<depth>-solver.prototxt`` (the paper's schedule)."""
    return f"""\
# SGD as in He et al. (2015), section 3.4: mini-batch 256, momentum 0.9, weight decay 1e-4,
# learning rate 0.1 divided by 10 when the error plateaus (here at fixed steps, every
# 150,000 iterations = 30 epochs of ImageNet's 1.28M images), up to 60e4 iterations.
# Each update accumulates iter_size = {256 // TRAIN_BATCH} train batches of {TRAIN_BATCH} images: 256.
net: "{net_dir}/ResNet-{depth}-train_val.prototxt"
# 50,000 validation images / test batch {TEST_BATCH}
test_iter: {50000 // TEST_BATCH}
test_interval: 10000
test_initialization: false
base_lr: 0.1
lr_policy: "multistep"
gamma: 0.1
stepvalue: 150000
stepvalue: 300000
stepvalue: 450000
max_iter: 600000
momentum: 0.9
weight_decay: 0.0001
iter_size: {256 // TRAIN_BATCH}
display: 20
average_loss: 20
snapshot: 10000
snapshot_prefix: "examples_out/resnet{depth}"
type: "SGD"
solver_mode: CPU
"""


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "resnet"),
        help="output folder (default: models/resnet of this project)")
    parser.add_argument("--depth", type=int, nargs="+", default=sorted(BLOCKS),
                        choices=sorted(BLOCKS), help="depths to write (default: all)")
    parser.add_argument("--no-train-val", action="store_true",
                        help="do not write the ResNet-50 train_val and solver files")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for depth in args.depth:
        write(os.path.join(args.out, f"ResNet-{depth}-deploy.prototxt"), deploy_text(depth))
    if not args.no_train_val:
        write(os.path.join(args.out, "ResNet-50-train_val.prototxt"), train_val_text(50))
        write(os.path.join(args.out, "ResNet-50-solver.prototxt"), solver_text(50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
