"""Command line: ``python -m robustagg bench [...]`` runs the benchmark, ``python -m robustagg
simulate [...]`` the federated simulation (``--help`` after either for its options)."""
import sys

COMMANDS = ("bench", "simulate")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m robustagg {bench,simulate} [--help] [options]")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if argv[0] == "bench":
        from .bench.cli import main as command
    else:
        from .simulate.cli import main as command
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
