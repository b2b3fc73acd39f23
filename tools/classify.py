"""Classify images with a trained net, like Caffe's ``python/classify.py``.

    python tools/classify.py INPUT OUTPUT.npy --model_def deploy.prototxt \\
        --pretrained_model weights.caffemodel [--images_dim 256,256] \\
        [--mean_file mean.binaryproto | --mean_value 104,117,123] [--raw_scale 255] \\
        [--channel_swap 2,1,0] [--center_only] [--labels_file synset_words.txt]

INPUT is an image file, a folder (its ``*.<ext>`` images, default ``--ext jpg``, in sorted
order), a ``.txt`` list of image paths (one per line; relative paths are taken from the
current folder, else from the list's folder; a trailing integer label, as in Caffe's image
lists, is ignored) or a ``.npy`` array of N x H x W x K images.  Images are loaded as RGB in
[0, 1] (``framework.io.load_image``; gray for a 1-channel net), resized to ``--images_dim``,
cut into 10 crops (4 corners + centre, and their mirrors; ``--center_only``: the centre crop)
of the net's input size, scaled by ``--raw_scale`` (default 255), channel-swapped
(``--channel_swap``, default 2,1,0 = RGB to BGR for 3-channel nets), mean-subtracted and
scaled by ``--input_scale``; the scores of the net's first output, averaged over the crops,
are saved to OUTPUT (N x classes, ``np.save``) and the top 5 of each image printed, with the
names from ``--labels_file`` (ImageNet ``synset_words.txt`` lines such as
``n01440764 tench, Tinca tinca``, or one name per line; line i names class i).

``--mean_file``: a ``.binaryproto`` (Caffe's compute_image_mean) or a ``.npy`` (C x H x W or
C); like Caffe's classify.py, the per-channel mean of a C x H x W mean is used.
``--mean_value``: one value per channel (or one for all), in the net's channel order.

Exit status 0 on success, 1 on any error (one line on stderr, no traceback).
"""
import argparse
import glob
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from framework.errors import CaffeError  # noqa: E402

TOP_K = 5


class UsageError(Exception):
    """A bad command line or input (reported on one line, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    """Parse the command line (raises UsageError on a bad one)."""
    p = _Parser(prog="classify.py", description=__doc__.split("\n\n")[0])
    p.add_argument("input_file", help="input image, folder of images, .txt list of images, or .npy")
    p.add_argument("output_file", help="output .npy file of scores (N x classes)")
    p.add_argument("--model_def", help="model definition (deploy prototxt); required")
    p.add_argument("--pretrained_model", help="trained weights (.caffemodel); required")
    p.add_argument("--gpu", action="store_true",
                   help="accepted for compatibility; this framework always runs on the CPU")
    p.add_argument("--center_only", action="store_true",
                   help="predict from the centre crop alone instead of averaging 10 crops")
    p.add_argument("--images_dim", default="256,256",
                   help="'height,width' images are resized to before cropping (default 256,256)")
    p.add_argument("--mean_file", default="",
                   help="mean image (.binaryproto or .npy, C x H x W or C); its per-channel "
                        "mean is subtracted")
    p.add_argument("--mean_value", default="",
                   help="per-channel mean to subtract, e.g. 104,117,123 (net channel order)")
    p.add_argument("--input_scale", type=float,
                   help="multiply the input by this after the mean subtraction")
    p.add_argument("--raw_scale", type=float, default=255.0,
                   help="multiply the raw [0, 1] image by this before the mean (default 255)")
    p.add_argument("--channel_swap", default=None,
                   help="channel order, e.g. 2,1,0 (the default for 3-channel nets: RGB to "
                        "BGR); '' for none")
    p.add_argument("--ext", default="jpg",
                   help="image extension taken from a folder INPUT (default jpg)")
    p.add_argument("--labels_file", default="",
                   help="class names: synset_words.txt lines or one name per line")
    p.add_argument("--print_results", action="store_true",
                   help="accepted for compatibility; the top 5 are always printed")
    return p.parse_args(argv)


def _int_list(text, flag, count=None):
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got '{text}'") from None
    if count is not None and len(values) != count:
        raise UsageError(f"{flag} needs {count} values, got '{text}'")
    return values


def load_mean(args, channels):
    """The mean to subtract (per channel) from --mean_file / --mean_value, or None."""
    from framework.io import load_mean_file

    if args.mean_file and args.mean_value:
        raise UsageError("give either --mean_file or --mean_value, not both")
    if args.mean_file:
        path = os.path.expanduser(args.mean_file)
        if not os.path.isfile(path):
            raise UsageError(f"mean file (--mean_file) not found: {path}")
        if path.endswith(".npy"):
            try:
                mean = np.load(path)
            except (ValueError, OSError) as exc:
                raise UsageError(f"cannot read mean file {path}: {exc}") from None
        else:
            mean = load_mean_file(path)
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.ndim == 3:
            return mean.mean(1).mean(1)  # classify.py: the per-channel mean
        if mean.ndim == 1:
            return mean
        raise UsageError(f"mean file {path} has shape {mean.shape}; expected C x H x W or C")
    if args.mean_value:
        try:
            values = np.array([float(s) for s in args.mean_value.split(",")], dtype=np.float32)
        except ValueError:
            raise UsageError(f"--mean_value must be comma-separated numbers, "
                             f"got '{args.mean_value}'") from None
        if values.size == 1:
            values = np.full(channels, values[0], dtype=np.float32)
        elif values.size != channels:
            raise UsageError(f"--mean_value has {values.size} values; the net input has "
                             f"{channels} channels (give one value or {channels})")
        return values
    return None


def list_images(input_file, ext):
    """Image paths named by INPUT: one file, a folder's ``*.ext`` files, or a .txt list."""
    if os.path.isdir(input_file):
        paths = sorted(glob.glob(os.path.join(glob.escape(input_file), "*." + ext)))
        if not paths:
            raise UsageError(f"no '*.{ext}' images in folder {input_file} (see --ext)")
        return paths
    if input_file.endswith(".txt"):
        try:
            with open(input_file) as f:
                lines = [line.strip() for line in f]
        except OSError as exc:
            raise UsageError(f"cannot read image list {input_file}: {exc.strerror}") from None
        base = os.path.dirname(os.path.abspath(input_file))
        paths = []
        for line in lines:
            if not line or line.startswith("#"):
                continue
            path = line
            parts = line.rsplit(None, 1)
            if not os.path.exists(line) and len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
                path = parts[0]  # "path label" (Caffe's image list format)
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(base, path)
            paths.append(path)
        if not paths:
            raise UsageError(f"image list {input_file} names no images")
        return paths
    return [input_file]


def load_inputs(input_file, ext, color):
    """``(names, images)`` for INPUT: a .npy array, or images loaded with load_image."""
    from framework.io import load_image

    if input_file.endswith(".npy"):
        print(f"Loading file: {input_file}")
        try:
            images = np.load(input_file)
        except (ValueError, OSError) as exc:
            raise UsageError(f"cannot read {input_file}: {exc}") from None
        if images.ndim != 4:
            raise UsageError(f"{input_file} has shape {images.shape}; expected N x H x W x K images")
        return [f"{input_file}[{i}]" for i in range(len(images))], images
    if not os.path.exists(input_file):
        raise UsageError(f"input not found: {input_file}")
    kind = "folder" if os.path.isdir(input_file) else "file"
    print(f"Loading {kind}: {input_file}")
    paths = list_images(input_file, ext)
    return paths, [load_image(path, color=color) for path in paths]


def read_labels(path, classes):
    """Class names, one per line (synset lines kept whole); checked against ``classes``."""
    try:
        with open(path) as f:
            labels = [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read labels file {path}: {exc.strerror}") from None
    if len(labels) != classes:
        raise UsageError(f"labels file {path} has {len(labels)} labels; the net's output has "
                         f"{classes} classes")
    return labels


def top_k_lines(scores, labels, k=TOP_K):
    """Printed lines of the top ``k`` classes: ``  0.81234 - "label" (class 3)``."""
    order = np.argsort(-scores, kind="stable")[:k]
    lines = []
    for c in order:
        name = f' - "{labels[c]}"' if labels is not None else ""
        lines.append(f"  {scores[c]:.5f}{name} (class {c})")
    return lines


def classify(args):
    """Run classify.py's work for parsed ``args``; returns the predictions array."""
    import framework

    for path, what in ((args.model_def, "--model_def"), (args.pretrained_model, "--pretrained_model")):
        if not path:
            raise UsageError(f"{what} is required")
    if not os.path.isfile(args.model_def):
        raise UsageError(f"model definition (--model_def) not found: {args.model_def}")
    if not os.path.isfile(args.pretrained_model):
        raise UsageError(f"weights file (--pretrained_model) not found: {args.pretrained_model}")
    image_dims = _int_list(args.images_dim, "--images_dim", 2)
    if min(image_dims) <= 0:
        raise UsageError(f"--images_dim must be positive, got '{args.images_dim}'")
    if args.gpu:
        print("GPU mode requested; running on the CPU")
    else:
        print("CPU mode")

    classifier = framework.Classifier(args.model_def, args.pretrained_model,
                                      image_dims=image_dims, input_scale=args.input_scale,
                                      raw_scale=args.raw_scale)
    # The input's channel count decides gray/colour loading and the default channel swap.
    in_ = classifier.inputs[0]
    channels = int(classifier.blobs[in_].shape[1])
    if args.channel_swap is None:
        channel_swap = [2, 1, 0] if channels == 3 else None
    elif args.channel_swap == "":
        channel_swap = None
    else:
        channel_swap = _int_list(args.channel_swap, "--channel_swap")
    if channel_swap is not None:
        classifier.transformer.set_channel_swap(in_, channel_swap)
    mean = load_mean(args, channels)
    if mean is not None:
        classifier.transformer.set_mean(in_, mean)
    classes = int(np.prod(classifier.blobs[classifier.outputs[0]].shape[1:]))
    labels = read_labels(args.labels_file, classes) if args.labels_file else None

    input_file = os.path.expanduser(args.input_file)
    names, inputs = load_inputs(input_file, args.ext, color=channels != 1)
    print(f"Classifying {len(inputs)} inputs.")
    start = time.time()
    predictions = classifier.predict(inputs, not args.center_only)
    print(f"Done in {time.time() - start:.2f} s.")

    flat = predictions.reshape(len(predictions), -1)
    for name, scores in zip(names, flat):
        print(f"{name}:")
        for line in top_k_lines(scores, labels):
            print(line)

    print(f"Saving results into {args.output_file}")
    np.save(args.output_file, predictions)
    return predictions


def main(argv=None):
    """Run classify.py; returns the exit status (0 ok, 1 error)."""
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"classify.py: error: {exc} (see --help)", file=sys.stderr)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        classify(args)
    except (UsageError, CaffeError) as exc:
        print(f"classify.py: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"classify.py: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("classify.py: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, no traceback (set CAFFE_TRACEBACK=1 to see it)
        if os.environ.get("CAFFE_TRACEBACK"):
            raise
        print(f"classify.py: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
