"""``python -m hfquant``: the ``hfquant`` command line."""

import sys

from hfquant.app.cli import main

sys.exit(main())
