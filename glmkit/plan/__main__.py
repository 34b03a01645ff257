"""`python -m glmkit.plan --config X [--check|--json]`: the memory plan from the command line."""

import sys

from glmkit.plan.fit import main

sys.exit(main())
