"""YAML for job specs, with bounds: what a job file or a `--set` value may make expkit build.

PyYAML's safe loader builds no objects but plain data, yet a few hundred bytes can still
stall it or what reads its result: aliases of aliases ("billion laughs": 9 levels of 9 aliases
are 387 million values to walk), an anchor that contains itself, lists nested a thousand
levels deep (a RecursionError), a number of 5000 digits, a date like 2024-13-45. This loader
refuses each of them as a YAML error at the line it starts on, before anything walks the data.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 100  # lists and mappings inside each other, aliases followed
MAX_VALUES = 100_000  # values of the whole document, each alias counted as what it repeats
MAX_CHARS = 4 * 1024 * 1024  # characters of its scalars, each alias counted as what it repeats
BOOL, STR = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:str"


class BoundError(ComposerError):
    """A document over one of the bounds (too deep, too many values, containing itself)."""


class BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses documents deeper than MAX_DEPTH, larger than MAX_VALUES
    values or MAX_CHARS characters once aliases are expanded, or containing themselves;
    duplicate keys in a mapping; and scalars Python cannot hold."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self._depth >= MAX_DEPTH:  # before PyYAML's recursive composer overflows
            mark = self.peek_event().start_mark
            raise BoundError(None, None, f"nested more than {MAX_DEPTH} levels deep", mark)
        self._nodes += 1
        if self._nodes > MAX_VALUES:  # as it is read: stops parsing a huge file early
            mark = self.peek_event().start_mark
            raise BoundError(None, None, f"holds more than {MAX_VALUES} values", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping; a key given twice is an error at its second line (PyYAML keeps the
        last silently), except keys that a merge (`<<: *base`) brings in. A key `on`, `off`,
        `yes` or `no` stays text (YAML 1.1 makes it a boolean; `retry: {on: [...]}` means
        the word, as GitHub Actions' `on:` does)."""
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                    key_node, ScalarNode
                ):
                    continue
                if key_node.tag == BOOL and key_node.value.lower() not in ("true", "false"):
                    key_node.tag = STR
                key = self.construct_object(key_node)
                if key in seen:
                    raise ConstructorError(
                        None, None, f"the key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as error:  # int("9" * 5000), date(2024, 13, 45)
            text = str(error)
            if "integer string conversion" in text:
                text = "a number with more than 4300 digits"
            raise ConstructorError(None, None, text, node.start_mark) from None


def load(text: str) -> Any:
    """The data of one YAML document; yaml.YAMLError for bad YAML or one over the bounds."""
    return yaml.load(text, Loader=BoundedLoader)  # a SafeLoader: plain data only


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _check_expansion(root: Node) -> None:
    """Depth, value count and characters of the document with every alias expanded,
    computed once per node (so in time linear in the file); raises BoundError at the first
    bound passed."""
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, depth, chars), capped
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            children = [sizes[id(child)] for child in _children(node)]
            values = min(1 + sum(v for v, _, _ in children), MAX_VALUES + 1)
            depth = 1 + max((d for _, d, _ in children), default=0)
            own = len(node.value) if isinstance(node.value, str) else 0
            chars = min(own + sum(c for _, _, c in children), MAX_CHARS + 1)
            if values > MAX_VALUES:
                raise BoundError(
                    None,
                    None,
                    f"expands to more than {MAX_VALUES} values through aliases (*name)",
                    node.start_mark,
                )
            if chars > MAX_CHARS:
                raise BoundError(
                    None,
                    None,
                    f"expands to more than {MAX_CHARS // (1024 * 1024)} MiB of text through "
                    "aliases (*name)",
                    node.start_mark,
                )
            if depth > MAX_DEPTH:
                raise BoundError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", node.start_mark
                )
            sizes[key] = (values, depth, chars)
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise BoundError(
                    None, None, "an alias refers to a value that contains it", node.start_mark
                )
            if id(child) not in sizes:
                stack.append((child, False))
