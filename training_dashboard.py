#!/usr/bin/env python3
"""Browser dashboard for a glmkit training run.

    python training_dashboard.py --config training_config.yaml [--port 5000]
    python training_dashboard.py --logs runs/my-run/logs

The dashboard only reads the JSON-lines logs under <output_dir>/logs and the
checkpoint metadata under <output_dir>; see docs/DASHBOARD.md.  For serving,
prefer ./launch_dashboard.sh (gunicorn, auth defaults).
"""

import sys

from glmkit.dashboard import create_app
from glmkit.dashboard.cli import app_from_env, main

__all__ = ["create_app", "app_from_env", "main"]

if __name__ == "__main__":
    sys.exit(main())
