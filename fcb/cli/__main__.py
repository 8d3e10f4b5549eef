"""`python -m fcb.cli`: the `fcb` command."""

import sys

from fcb.cli import main

if __name__ == "__main__":
    sys.exit(main())
