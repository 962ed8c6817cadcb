"""Command line: ``python -m robustagg bench [...]`` runs the benchmark (``--help`` for options)."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m robustagg bench [--help] [options]")
        return 0 if argv else 2
    if argv[0] != "bench":
        print(f"unknown command {argv[0]!r}; the only command is 'bench'", file=sys.stderr)
        return 2
    from .bench.cli import main as bench_main
    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
