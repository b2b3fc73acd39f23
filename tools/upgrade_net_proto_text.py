"""Upgrade a net definition in text format (prototxt) to the current Caffe format.

Like Caffe's ``upgrade_net_proto_text``: reads IN as a text NetParameter, applies every legacy
upgrade (V0 and V1 layers, data-transformation fields, ``input:`` headers, BatchNorm param
specs; see ``framework/upgrade.py``) and writes the result to OUT as text.  A file already in
the current format is written unchanged (with a warning).

Usage:  python tools/upgrade_net_proto_text.py IN.prototxt OUT.prototxt

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
    """Command-line arguments: the input and output prototxt paths."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="net definition to upgrade (text NetParameter)")
    p.add_argument("output", help="where to write the upgraded net definition (text)")
    return p.parse_args(argv)


def main(argv=None):
    """Read, upgrade and write; returns the exit status."""
    args = parse_args(argv)
    init_logging()
    try:
        upgrade_net_file(args.input, args.output, binary=False)
    except NetError as e:
        log.error("%s", e)
        return 1
    except (CaffeError, OSError) as e:
        log.error("%s", e)
        return 2
    log.info("Wrote upgraded NetParameter text proto to %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
