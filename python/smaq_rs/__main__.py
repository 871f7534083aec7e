"""``python -m smaq_rs <command>``: ``bench`` prints the codec comparison table."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m smaq_rs bench [options]   (python -m smaq_rs bench --help)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    print(f"unknown command {cmd!r}; available: bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
