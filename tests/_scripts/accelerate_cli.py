"""``python THIS launch ...`` is ``accelerate launch ...``: Accelerate's command line, run with
the current interpreter, so that tests/_scripts/launch.py can start (and time-limit) it."""

import sys

from accelerate.commands.accelerate_cli import main

if __name__ == "__main__":
    sys.exit(main())
