"""The docs' configuration table, rendered from the fields' metadata: help, default, bounds and resume rule are
written once, beside each field in glmkit/config/schema.py.

    python -m glmkit.config.docs_table            # print the table
    python -m glmkit.config.docs_table --update   # rewrite it in place between its markers
"""

from __future__ import annotations

import os
import sys

from glmkit.config.keys import config_fields
from glmkit.config.parse import bounds_text, field_default
from glmkit.config.schema import KIT_ROOT

# The file that holds the table, between `<!-- config-table ... -->` and `<!-- /config-table -->`.
TABLE_FILE = os.path.join(KIT_ROOT, "docs", "CONFIGURATION.md")


def _markdown_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(value) + "]"
    return f"`{value}`" if isinstance(value, str) else repr(value)


def _on_resume(f) -> str:
    return f.metadata.get("on_resume") or ("fixed" if f.metadata.get("critical") else "may change")


def config_table() -> str:
    """The configuration table, one row per key in file order."""
    rows = ["| key | default | what it does | valid | on resume |", "|---|---|---|---|---|"]
    for key, f in config_fields():
        rows.append(f"| `{key}` | {_markdown_value(field_default(f))} | {f.metadata.get('help', '')} | "
                    f"{bounds_text(f) or ''} | {_on_resume(f)} |")
    return "\n".join(rows) + "\n"


def update_table(path: str = TABLE_FILE) -> None:
    """Rewrite the configuration table between its markers from the fields."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index("\n", text.index("<!-- config-table")) + 1
    end = text.index("<!-- /config-table -->")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:start] + config_table() + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        update_table()
    else:
        print(config_table(), end="")
