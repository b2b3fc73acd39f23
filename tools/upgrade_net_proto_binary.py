"""Upgrade a binary net (``.caffemodel``) to the current Caffe format, weights included.

Like Caffe's ``upgrade_net_proto_binary``: reads IN as a binary NetParameter, applies every
legacy upgrade (V0 and V1 layers, data-transformation fields, ``input:`` headers, BatchNorm
param specs; see ``framework/upgrade.py``) keeping every weight blob as it is, and writes the
result to OUT in binary, atomically (temporary file + rename).  A file already in the current
format is written unchanged (with a warning).

Usage:  python tools/upgrade_net_proto_binary.py IN.caffemodel OUT.caffemodel

Exit status: 0 on success, 1 if the upgrade failed, 2 if IN could not be read or parsed
or OUT could not be written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.errors import CaffeError, NetError  # noqa: E402
from framework.logging_util import get_logger, init_logging  # noqa: E402
from framework.upgrade import upgrade_net_file  # noqa: E402

log = get_logger("tools")


def parse_args(argv=None):
    """Command-line arguments: the input and output .caffemodel paths."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="binary NetParameter (.caffemodel) to upgrade")
    p.add_argument("output", help="where to write the upgraded binary NetParameter")
    return p.parse_args(argv)


def main(argv=None):
    """Read, upgrade and write; returns the exit status."""
    args = parse_args(argv)
    init_logging()
    try:
        upgrade_net_file(args.input, args.output, binary=True)
    except NetError as e:
        log.error("%s", e)
        return 1
    except (CaffeError, OSError) as e:
        log.error("%s", e)
        return 2
    log.info("Wrote upgraded NetParameter binary proto to %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
