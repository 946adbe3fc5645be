"""The ``densessm`` console command.

It lives outside the package because importing ``densessm`` (torch, transformers) takes seconds: Ctrl-C in that
time would otherwise end in a traceback instead of the command's one line and exit code 130.
"""

import sys


def main() -> int:
    try:
        from densessm.cli import main as run
    except KeyboardInterrupt:
        print("densessm: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":  # python -m densessm_entry: what the experiment runs for each command
    sys.exit(main())
