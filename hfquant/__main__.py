"""``python -m hfquant``: the ``hfquant`` command line."""

import sys

from hfquant.cli import main

sys.exit(main())
