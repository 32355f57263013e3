"""Reading YAML that a stranger wrote: plain values only, bounded in size and depth.

Specs, saved folders' ``attnzoo.yaml`` and weight manifests are all read here, with
a stricter ``yaml.SafeLoader``: no Python or other tags, no repeated keys, no alias
bombs. Any problem is a SpecError naming where the text came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .atomic import read_capped
from .errors import SpecError

#: Most YAML nodes a spec may expand to, counting every use of an alias. Zoo specs have
#: a few dozen; aliases that multiply (a "billion laughs") would otherwise blow up in
#: model_dump / to_yaml / comparisons long after loading.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64
#: Largest spec file read (the zoo's are a few kB): a device or a huge file is refused
#: before it fills the memory.
MAX_SPEC_BYTES = 4 << 20
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_NOT_PLAIN = ("binary", "set", "omap", "pairs", "timestamp")


class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for specs, stricter still: only JSON-like values (mappings,
    lists, strings, numbers, booleans, null). Python tags and unknown tags are refused
    (SafeLoader already), and so are ``!!binary``, ``!!set``, ``!!omap``, ``!!pairs`` and
    ``!!timestamp``; an unquoted date stays a string; a key given twice is an error."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` may be overridden by the mapping's own keys
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} twice (first on line {first})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def fetch_flow_collection_start(self, TokenClass: type) -> None:  # noqa: N803
        # PyYAML's scanner slows down quadratically with the flow level (seconds for a
        # line of `[`); a spec is a few levels deep.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"[ and {{ nested more than {MAX_YAML_DEPTH} deep", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def _refuse_tag(self, node: yaml.Node) -> None:
        raise yaml.constructor.ConstructorError(
            None, None, f"tag {node.tag!r} is not allowed in a spec: plain YAML values only "
            "(mappings, lists, strings, numbers, booleans, null)", node.start_mark)


SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _name in _NOT_PLAIN:
    SpecLoader.add_constructor(f"tag:yaml.org,2002:{_name}", SpecLoader._refuse_tag)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes in the document with every alias expanded (memoised per node, so a bomb
    is measured without being expanded); raises ValueError on a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if done:
            active.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if key in sizes:
            continue
        if key in active:
            raise ValueError(f"recursive alias at line {node.start_mark.line + 1}")
        active.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in active:
                raise ValueError(f"recursive alias at line {child.start_mark.line + 1}")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def load_yaml(text: str, origin: str = "spec") -> Any:
    """Read one YAML document with :class:`SpecLoader`; any problem is a SpecError that
    names ``origin``. Use this (not ``yaml.safe_load``) for anything a stranger wrote."""
    try:
        loader = SpecLoader(text)  # the reader refuses control characters here
    except yaml.YAMLError as exc:
        raise SpecError(f"{origin}: not valid YAML (safe subset): {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, MAX_YAML_NODES)
        if size > MAX_YAML_NODES:
            raise SpecError(f"{origin}: YAML expands to more than {MAX_YAML_NODES} nodes "
                            "(aliases that multiply); a spec is small")
        return loader.construct_document(node)
    except SpecError:
        raise
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: recursive alias, huge int
        raise SpecError(f"{origin}: not valid YAML (safe subset): {exc}") from None
    except RecursionError:
        raise SpecError(f"{origin}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_source(source: str | os.PathLike[str], *,
                within: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """The text of a spec and where it came from: a path (a PathLike, or a string
    ending in .yaml/.yml) is read, at most :data:`MAX_SPEC_BYTES`, and only when it is
    a regular file (inside the folder ``within``, when given); other text is the spec."""
    if isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source
        and source.endswith((".yaml", ".yml"))
    ):
        path = Path(source)
        try:
            data = read_capped(path, MAX_SPEC_BYTES, SpecError, "a spec", within=within)
            return data.decode("utf-8"), str(path)
        except OSError as exc:
            raise SpecError(f"cannot read spec file {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise SpecError(f"{path}: a spec file is UTF-8 text: {exc}") from None
    return str(source), "spec"
