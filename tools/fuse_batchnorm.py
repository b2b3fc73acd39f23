"""Fold inference BatchNorm (+ Scale) layers into the preceding convolutions of a trained net.

Writes a deploy prototxt without those layers (each folded Convolution gets
``bias_term: true``) and a binary .caffemodel with the folded weights; both load in
this framework, in Caffe and in OpenCV's Caffe importer.  The outputs equal the
original net's (TEST phase) up to float32 round-off.  See ``framework/fuse.py``
for the math and the conditions under which a chain is folded.

Usage:  python tools/fuse_batchnorm.py MODEL WEIGHTS OUT_MODEL OUT_WEIGHTS

Exit status: 0 on success, 1 if a file could not be read, parsed, folded or written.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.errors import CaffeError  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fold BatchNorm/Scale layers into the convolutions before them (TEST phase).")
    parser.add_argument("model", help="the net definition (deploy .prototxt)")
    parser.add_argument("weights", help="the trained weights (.caffemodel)")
    parser.add_argument("out_model", help="where to write the fused deploy .prototxt")
    parser.add_argument("out_weights", help="where to write the fused .caffemodel")
    return parser.parse_args(argv)


def main(argv=None):
    """Fuse, write both files, print a summary; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import framework
    from framework import io as caffe_io
    from framework.fuse import fused_net

    try:
        net = fused_net(args.model, args.weights, phase=framework.TEST)
        caffe_io.write_prototxt(args.out_model, net.fused.param)
        net.save(args.out_weights)
    except (CaffeError, OSError) as exc:
        print(f"fuse_batchnorm: {exc}", file=sys.stderr)
        return 1
    print(f"Folded {len(net.fused.folds)} BatchNorm layer(s)"
          f" ({sum(1 for f in net.fused.folds if f.scale)} with their Scale) into convolutions.")
    for name, reason in net.fused.skipped:
        print(f"Left BatchNorm '{name}' in place: {reason}.")
    print(f"Wrote {args.out_model} and {args.out_weights}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
