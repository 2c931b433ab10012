"""``softprompt-kernels`` command line: ``bench``, ``selfcheck``, ``report``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="softprompt-kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("selfcheck", help="run the ops against the float64 reference on the present device")
    sub.add_parser("bench", add_help=False, help="self-check, then the quick benchmark suite on the present device (--full: all shapes; "
                   "--gpu: every GPU test + the GPU TFLOP/s grid, see ./dev gpu)")
    sub.add_parser("report", help="static report of the Triton kernels compiled for sm_80 / sm_90")
    args, rest = parser.parse_known_args(argv)
    if args.command == "selfcheck":
        from . import selfcheck
        return selfcheck.main(rest)
    if args.command == "bench":
        from . import bench
        return bench.main(rest)
    if args.command == "report":
        from . import report
        return report.main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
