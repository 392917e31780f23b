"""Bounded reading of the YAML and JSON files users write (presets, ensemble files), and short
quotes of user values for error lines.

A file is read only up to `MAX_FILE_BYTES`, must be UTF-8, and may nest `MAX_DEPTH` levels. YAML
aliases are measured before anything is built: a document whose aliases would expand to more
than `MAX_EXPANDED` (counted as `NODE_COST` per node plus each scalar's text) is refused, so an
alias bomb costs the size of its text, not of its expansion. Imports nothing of mlkd but errors.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from mlkd_cli.core.errors import UserError

MAX_FILE_BYTES = 1 << 20  # presets and ensemble files are a few hundred bytes
MAX_DEPTH = 64  # nesting levels of lists and mappings, aliases followed
NODE_COST = 32  # what one list, mapping or scalar counts for in the expanded size
MAX_EXPANDED = 4 << 20  # the document with its aliases expanded, in NODE_COST units + text
QUOTE_CHARS = 100  # the most of a user's value an error line quotes

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = QUOTE_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
# A JSON string, to step over when counting brackets (escapes included).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` cut to about `limit` characters, without building the whole of it."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def clip(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`value`'s text (a path, a name, a message) cut to `limit` characters, marked with `...`
    when cut."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(path: Path | str, limit: int = QUOTE_CHARS) -> str:
    """A path as an error line quotes it: whole, or its first and last characters (a path's end,
    the file name, says the most; `clip` keeps the start of other text)."""
    text = str(path)
    if len(text) <= limit:
        return text
    half = limit // 2 - 2
    return f"{text[:half]}...{text[-half:]}"


def finite_number(value: Any, what: str) -> float:
    """`value` as a float, refused (naming `what`) unless it is a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {quote(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float (JSON's 1 followed by 400 zeros)
        raise UserError(f"{what} is too large, got {quote(value, 40)}; fix it") from None
    if not math.isfinite(number):
        raise UserError(f"{what} is {quote(value, 40)}, not a finite number; fix it")
    return number


def read_text_file(path: Path, what: str) -> str:
    """A user's text file, refused when larger than `MAX_FILE_BYTES` or not UTF-8."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or exc}); check it") from exc
    if len(data) > MAX_FILE_BYTES:
        raise UserError(
            f"{what} {path} is over {MAX_FILE_BYTES >> 20} MiB; such files are a few lines long"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from exc


def load_json(text: str, origin: str) -> Any:
    """JSON text, its nesting checked before parsing (no RecursionError, no giant numbers)."""
    _check_json_depth(text, origin)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an int of 4300+ digits
        reason = str(exc).splitlines()[0][:QUOTE_CHARS] if str(exc) else type(exc).__name__
        raise UserError(f"{origin} is not valid JSON ({reason}); fix the file") from exc


def _check_json_depth(text: str, origin: str) -> None:
    depth = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise UserError(f"{origin} nests deeper than {MAX_DEPTH} levels; flatten it")


class _TooLarge(Exception):
    """The document breaks a limit; the message is the error line's reason."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document nested deeper than `MAX_DEPTH` as it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose one node, one level deeper (PyYAML's composer recurses here)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _TooLarge(f"nests deeper than {MAX_DEPTH} levels; flatten it")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, origin: str) -> Any:
    """YAML text, safely: plain data only, nesting and alias expansion bounded (see module)."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, 1, {}, set())
        return loader.construct_document(node)
    except _TooLarge as exc:
        raise UserError(f"{origin} {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = (getattr(exc, "problem", None) or exc.__class__.__name__)[:QUOTE_CHARS]
        raise UserError(f"{origin} is not valid YAML ({problem}{where}); fix the file") from exc
    except ValueError as exc:  # a scalar PyYAML cannot build (an int of 4300+ digits)
        raise UserError(f"{origin} holds a value that cannot be read; fix the file") from exc
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _measure(node: yaml.Node, level: int, seen: dict[int, tuple[int, int]], open_: set) -> int:
    """The node's expanded size (aliases counted at every use) and height, each node once."""
    if level > MAX_DEPTH:
        raise _TooLarge(f"nests deeper than {MAX_DEPTH} levels (aliases followed); flatten it")
    if id(node) in seen:
        size, height = seen[id(node)]
    elif id(node) in open_:
        raise _TooLarge("holds an alias that refers to itself; remove the loop")
    else:
        open_.add(id(node))
        size = NODE_COST + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
        height = 0
        for child in _children(node):
            size += _measure(child, level + 1, seen, open_)
            height = max(height, seen[id(child)][1] + 1)
            if size > MAX_EXPANDED:
                raise _TooLarge(
                    "expands (through its aliases) past the size limit; "
                    "write the values out instead of repeating aliases"
                )
        open_.discard(id(node))
        seen[id(node)] = (size, height)
    if level + height > MAX_DEPTH:
        raise _TooLarge(f"nests deeper than {MAX_DEPTH} levels (aliases followed); flatten it")
    return size


def load_data_file(path: Path, what: str, syntax: str) -> Any:
    """A user's YAML or JSON file (`syntax`), read with every limit of this module."""
    text = read_text_file(path, what)
    origin = f"{what} {path}"
    return load_yaml(text, origin) if syntax == "yaml" else load_json(text, origin)
