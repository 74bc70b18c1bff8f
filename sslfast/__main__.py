"""Command line: ``python -m sslfast env`` and ``python -m sslfast bench``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sslfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, built backends and what can run on this machine")
    bench = sub.add_parser("bench", help="time every op on its production shapes (wav2vec2-base by default)")
    from .bench.harness import add_arguments

    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import env_report

        print(env_report())
        return 0
    from .bench.harness import main as bench_main

    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
