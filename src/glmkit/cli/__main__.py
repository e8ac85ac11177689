"""`python -m glmkit.cli`: the `glmkit` command without its console script."""

import sys

from . import main

sys.exit(main())
