"""Browser dashboard for glmkit training runs.

It only ever reads the JSON-lines logs the trainer writes (and checkpoint
metadata); it never touches the training itself.  See docs/DASHBOARD.md.
"""

from .app import create_app

__all__ = ["create_app"]
