"""Upgrade a net in binary format to the current Caffe format (Caffe's upgrade_net_proto_binary).

Applies every legacy upgrade (V0 and V1 layers, data-transformation fields, ``input:``
headers, BatchNorm param specs; see ``framework/upgrade.py``) and writes the result.

Usage:  python tools/upgrade_net_proto_binary.py IN.caffemodel OUT.caffemodel

Exit status: 0 on success, 1 if the upgrade failed, 2 if IN could not be read or parsed
or OUT could not be written.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.upgrade import upgrade_tool_main  # noqa: E402


def main(argv=None):
    """Read, upgrade and write; returns the exit status."""
    return upgrade_tool_main(argv, binary=True)


if __name__ == "__main__":
    sys.exit(main())
