"""`python -m sweep.report`: the comparison report of a sweep, or of any runs, from the tracking store."""

import sys

from sweep.report.cli import main

sys.exit(main())
