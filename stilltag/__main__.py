"""The ``stilltag`` executable (and ``python -m stilltag``).

Loading the command line imports most of the project (about a second); Ctrl-C in that second ends
in one line and status 130, like Ctrl-C at any later moment, instead of a traceback.
"""

from __future__ import annotations

import sys

INTERRUPTED = "interrupted (Ctrl-C) before the command started; nothing was done"


def main() -> None:
    try:
        from stilltag.cli import main as run
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
