"""``python -m landscape.curvature`` (:mod:`landscape.curvature.cli`)."""

import sys

from landscape.curvature.cli import main

if __name__ == "__main__":
    sys.exit(main())
