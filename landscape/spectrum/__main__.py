"""python -m landscape.spectrum (see :mod:`landscape.spectrum.cli`)."""

import sys

from landscape.spectrum.cli import main

sys.exit(main())
