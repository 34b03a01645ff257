"""Reading a YAML config file defensively: bounded size, bounded alias expansion, no duplicate keys.

PyYAML's `safe_load` lets the last of two equal keys win without a word (a second `training:`
section silently resets the first one's keys), expands anchors and aliases without limit (a
"billion laughs" file of a few hundred bytes becomes a value that takes minutes and gigabytes to
print), and reads a file of any size. A config is a few kilobytes written by hand, so here:

- the file may hold at most MAX_CONFIG_BYTES;
- a mapping may not name a key twice (merge keys `<<:` still override, as YAML means them), and an
  alias may not contain itself;
- anchors and aliases may expand to at most MAX_EXPANDED_NODES values in all, counted on the
  composed node graph (shared nodes counted once per use, memoized) before anything is built.

Each refusal is a `YamlFileError` whose message names the line(s) and the fix. `shown(value)`
quotes a value for a message without walking or printing more than a few dozen characters of it.
"""

from __future__ import annotations

import reprlib

import yaml

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: the shipped training_config.yaml is about 10 KiB
MAX_EXPANDED_NODES = 100_000  # values after expanding aliases; a real config has a few hundred
SHOWN_CHARS = 80

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 6, 4, 3


def shown(value) -> str:
    """A short repr of `value` for an error message: nested and long values are elided, never expanded."""
    text = _repr.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


class YamlFileError(ValueError):
    """The file can't be read as a config; the message says where and what to change."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that bounds alias expansion and refuses duplicate keys, both checked on the composed nodes."""

    def construct_document(self, node):
        _check_expansion(node)
        _check_duplicate_keys(node)
        return super().construct_document(node)


def _check_duplicate_keys(root) -> None:
    """Refuse a mapping that names a key twice, naming the dotted key and both lines."""
    seen_nodes: set[int] = set()
    stack = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, f"{prefix}[{index}]") for index, child in enumerate(node.value))
        if not isinstance(node, yaml.MappingNode):
            continue
        first_line: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<: *base` then `key: ...` overrides on purpose
            dotted = f"{prefix}.{key_node.value}" if prefix else key_node.value
            line = key_node.start_mark.line + 1
            first = first_line.setdefault((key_node.tag, key_node.value), line)
            if first != line:
                raise YamlFileError(f"key {shown(dotted)} appears twice, at lines {first} and {line} (the second "
                                    f"would silently replace the first); keep one and merge their settings")
            stack.append((value_node, dotted))


def _check_expansion(root) -> None:
    """Refuse a document whose aliases expand it past MAX_EXPANDED_NODES values."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    # Iterative post-order walk: a deeply nested file must not exhaust Python's recursion limit either.
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not children_done:
            if id(node) in visiting:  # `&a [*a]`: YAML allows it, a config has no use for it
                raise YamlFileError(f"an alias refers to the value that contains it (near line "
                                    f"{node.start_mark.line + 1}); write the value out instead")
            visiting.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        visiting.discard(id(node))
        size = 1 + sum(sizes.get(id(child), 1) for child in children)
        sizes[id(node)] = size
        if size > MAX_EXPANDED_NODES:
            raise YamlFileError(f"its anchors and aliases expand to more than {MAX_EXPANDED_NODES:,} values "
                                f"(near line {node.start_mark.line + 1}); a config needs far fewer: write the "
                                f"values out instead of nesting aliases")


def load_yaml_file(path: str):
    """The file's YAML document as plain data; OSError, UnicodeDecodeError, yaml.YAMLError or YamlFileError."""
    with open(path, "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise YamlFileError(f"the file is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few kilobytes: pass "
                            f"--config the YAML settings file (training_config.yaml), not data")
    text = raw.decode("utf-8")
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
