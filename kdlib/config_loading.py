"""Turn a YAML file plus ``a.b.c=value`` command-line overrides into a validated pydantic model.

This module knows nothing about kdlib's concrete schema; it only knows how to read YAML safely,
apply overrides, and translate pydantic's validation errors into messages that point at the
file and line (or the command line) where each bad value came from.

Public API:
    parse_overrides(items)           -> [(key path, value), ...]
    apply_overrides(data, overrides) -> new dict
    load_config(model_cls, path, overrides=()) -> validated model
    dump_config(cfg, path)           -> writes the resolved config as YAML
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kdlib import storage
from kdlib.errors import ConfigError

__all__ = ["parse_overrides", "apply_overrides", "load_config", "dump_config"]

ModelT = TypeVar("ModelT", bound=BaseModel)
KeyPath = tuple[str, ...]
Loc = tuple[Any, ...]

# Longest repr of a bad value shown in an error line.
_MAX_VALUE_REPR = 60

# PyYAML implements YAML 1.1, whose float regex demands a dot, so `1e-4` and `5e3` load as
# strings. Those are the normal way to write learning rates, so also resolve them as floats.
_EXP_FLOAT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_EXP_FLOAT_FIRST_CHARS = list("-+0123456789.")


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary object construction) that also reads `1e-4` as a float."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings like '1e-4' so `_Loader` reads them back as strings."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT_RE, _EXP_FLOAT_FIRST_CHARS)


# --------------------------------------------------------------------------- overrides


def parse_overrides(items: Iterable[str]) -> list[tuple[KeyPath, object]]:
    """Parse ``a.b.c=value`` command-line overrides.

    The value is parsed as YAML (``"3"`` -> 3, ``"1e-4"`` -> 0.0001, ``"[1,2]"`` -> [1, 2],
    ``"null"`` -> None, ``"true"`` -> True, ``"x"`` -> "x"); quote it to force a string
    (``name="'123'"``). An empty value (``a=``) is the empty string.

    Args:
        items: Override strings, as given on the command line.

    Returns:
        One ``(key path, value)`` pair per item, in order.

    Raises:
        ConfigError: An item lacks ``=``, has an empty key or key segment, or its value is
            not valid YAML.
    """
    return [_parse_override(item) for item in items]


def _parse_override(item: str) -> tuple[KeyPath, object]:
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE (e.g. train.epochs=3)")
    key = key.strip()
    parts = tuple(p.strip() for p in key.split("."))
    if not key or not all(parts):
        raise ConfigError(f"override {item!r}: empty key or key segment in {key!r}")
    return parts, _parse_override_value(item, raw)


def _parse_override_value(item: str, raw: str) -> object:
    # safe_load("") is None, which would silently null a field; `a=null` is the explicit way.
    if raw.strip() == "":
        return ""
    try:
        return _load_yaml_text(raw)[1]
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"override {item!r}: value {raw!r} is not valid YAML ({problem}); "
            f"quote it to pass a string"
        ) from None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[tuple[KeyPath, object]]) -> dict:
    """Return a copy of ``data`` with each override's key path set to its value.

    Missing intermediate mappings are created; a value that is itself a mapping replaces the
    existing one rather than being merged into it. ``data`` is not modified.

    Args:
        data: The config as loaded from YAML.
        overrides: ``(key path, value)`` pairs, e.g. from :func:`parse_overrides`. Later
            pairs win over earlier ones.

    Returns:
        A new dict with the overrides applied.

    Raises:
        ConfigError: A path goes below a value that is not a mapping (e.g. ``lr.x=1`` when
            ``lr`` is a number).
    """
    result = copy.deepcopy(dict(data))
    for path, value in overrides:
        node: dict = result
        for depth, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {'.'.join(path)}: cannot set a key below "
                    f"{'.'.join(path[: depth + 1])}, which is {_short_repr(child)}, not a mapping"
                )
            node = child
        node[path[-1]] = copy.deepcopy(value)
    return result


# --------------------------------------------------------------------------- loading


def load_config(
    model_cls: type[ModelT], path: str | Path, overrides: Iterable[str] = ()
) -> ModelT:
    """Load a YAML config file, apply command-line overrides and validate it.

    Args:
        model_cls: The pydantic model describing the config's top level.
        path: The YAML file.
        overrides: ``a.b.c=value`` strings; see :func:`parse_overrides`.

    Returns:
        The validated model.

    Raises:
        ConfigError: The file is missing or unreadable, is not valid YAML, has duplicate keys,
            its top level is not a mapping, an override is malformed, or validation fails.
            A validation failure lists every problem on its own line as
            ``FILE, line N: key.path = value: what is allowed``.
    """
    path_str = str(path)
    text = _read_text(path_str)
    try:
        root, data = _load_yaml_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error_message(path_str, exc)) from None
    if root is None:
        raise ConfigError(f"{path_str}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path_str}, line {_line(root)}: the top level must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    parsed = parse_overrides(overrides)
    data = apply_overrides(data, parsed)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        context = _ErrorContext(path_str, root, data, [p for p, _ in parsed], model_cls)
        problems = [_describe_error(context, err) for err in exc.errors(include_url=False)]
        problems = list(dict.fromkeys(problems))  # union members can repeat the same problem
        noun = "problem" if len(problems) == 1 else "problems"
        error = ConfigError(
            f"invalid config {path_str} ({len(problems)} {noun}):\n" + "\n".join(problems)
        )
        error.problems = problems  # type: ignore[attr-defined]  # for callers that want lines
        raise error from None


def config_yaml(cfg: BaseModel) -> str:
    """A resolved config as YAML that :func:`load_config` reads back as an equal model (field order kept)."""
    return yaml.dump(cfg.model_dump(mode="json", by_alias=True), Dumper=_Dumper, sort_keys=False,
                     allow_unicode=True, default_flow_style=False)


def dump_config(cfg: BaseModel, location: str | Path) -> None:
    """Write a resolved config as YAML to a local path or a storage URI, atomically (a crash never leaves a
    half-written config in a run directory); parent folders are created."""
    storage.write_text_at(str(location), config_yaml(cfg))


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def _load_yaml_text(text: str) -> tuple[yaml.Node | None, Any]:
    """Parse YAML once into both the node tree (for line numbers) and Python data.

    This is what ``yaml.safe_load`` does, except that it keeps the node tree and uses
    `_Loader`, which is a SafeLoader too.
    """
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        # Construction flattens `<<` merge keys in place, so check duplicates first.
        _check_duplicate_keys(root)
        return root, loader.construct_document(root)
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, seen_nodes: set[int] | None = None) -> None:
    """Reject a mapping that repeats a key: PyYAML would silently keep only the last one."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # aliases share nodes, and may even form cycles
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in first_line:
                    raise yaml.MarkedYAMLError(
                        problem=f"duplicate key {key_node.value!r} "
                        f"(first defined on line {first_line[key_node.value]})",
                        problem_mark=key_node.start_mark,
                    )
                first_line[key_node.value] = _line(key_node)
            _check_duplicate_keys(value_node, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, seen_nodes)


def _yaml_error_message(path: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f"{where}: invalid YAML: {problem}"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


# --------------------------------------------------------------------------- validation errors


class _ErrorContext(typing.NamedTuple):
    """Everything needed to explain one pydantic error."""

    file: str
    root: yaml.Node
    data: dict
    override_paths: list[KeyPath]
    model_cls: type[BaseModel]


def _describe_error(ctx: _ErrorContext, err: Mapping[str, Any]) -> str:
    """Render one pydantic error as ``FILE, line N: key.path = value: message``."""
    loc: Loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    path, tags = _data_path(ctx.data, loc, kind)
    shown = _format_path(path) or "(top level)"
    message = str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        allowed = _allowed_keys(ctx.model_cls, loc[:-1])
        if allowed is not None:
            message += "; allowed keys: " + (", ".join(allowed) or "(none)")
    if "[key]" in loc:
        subject = f"key {_short_repr(err.get('input'))} of {_format_path(path[:-1]) or '(top level)'}"
    elif kind == "missing":
        subject = f"{shown} is missing"
    elif not path:  # a model-level validator: the input is the whole config, too big to show
        subject = shown
    else:
        subject = f"{shown} = {_short_repr(err.get('input'))}"
    # A union reports one error per member; naming the member tells them apart.
    if tags:
        subject += " (as " + ", ".join(map(str, tags)) + ")"
    return f"{_where(ctx, path)}: {subject}: {message}"


def _data_path(data: Any, loc: Loc, kind: str) -> tuple[Loc, Loc]:
    """Map a pydantic ``loc`` onto keys and indexes of the validated data.

    Pydantic inserts entries that are not keys: union member tags (a class name, a
    discriminator value, ``'int'``, ``"literal['auto']"``, ``'function-after[...]'``) and
    ``'[key]'`` for a bad dict key. Those are dropped. The last entry of a ``missing`` error
    is the absent key, which is kept.

    Returns:
        The key path, and the union member tags that were dropped from it.
    """
    path: list[Any] = []
    tags: list[Any] = []
    node = data
    for i, entry in enumerate(loc):
        is_last = i == len(loc) - 1
        if isinstance(node, dict) and entry in node:
            node = node[entry]
        elif isinstance(node, list) and isinstance(entry, int) and -len(node) <= entry < len(node):
            node = node[entry]
        elif is_last and kind == "missing" and isinstance(node, dict):
            pass
        else:
            if entry != "[key]":
                tags.append(_clean_tag(entry))
            continue
        path.append(entry)
    return tuple(path), tuple(tags)


def _clean_tag(tag: Any) -> Any:
    """Strip validator wrappers from a union tag: 'function-after[check(), A]' -> 'A'."""
    if not isinstance(tag, str):
        return tag
    while (start := tag.find("function-")) >= 0:
        open_at = tag.find("[", start)
        close_at = _matching_bracket(tag, open_at)
        if open_at < 0 or close_at < 0:
            break
        inner = tag[open_at + 1 : close_at]
        _, sep, wrapped = inner.partition("(), ")
        tag = tag[:start] + (wrapped if sep else inner) + tag[close_at + 1 :]
    return tag


def _matching_bracket(text: str, open_at: int) -> int:
    if open_at < 0:
        return -1
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _format_path(path: Loc) -> str:
    text = ""
    for entry in path:
        text += f"[{entry}]" if isinstance(entry, int) else (f".{entry}" if text else str(entry))
    return text


def _where(ctx: _ErrorContext, path: Loc) -> str:
    """Say where the value at ``path`` came from: a line of the file or the command line."""
    node, depth = _find_node(ctx.root, path)
    # An override covers the path, or created the part of it the file does not have.
    for override in ctx.override_paths:
        if _is_prefix(override, path) or (
            depth < len(path) and _is_prefix(path[: depth + 1], override)
        ):
            return f"{ctx.file} (from command line)"
    return f"{ctx.file}, line {_line(node)}"


def _is_prefix(prefix: Loc, path: Loc) -> bool:
    return len(prefix) <= len(path) and tuple(map(str, path[: len(prefix)])) == tuple(
        map(str, prefix)
    )


def _find_node(root: yaml.Node, path: Loc) -> tuple[yaml.Node, int]:
    """Walk the YAML node tree along ``path``.

    Returns:
        The node for the deepest entry found (a mapping's key node, so the line is the key's,
        or a sequence item) and how many entries of ``path`` were found.
    """
    located, container = root, root
    for depth, entry in enumerate(path):
        child = _child_node(container, entry)
        if child is None:
            return located, depth
        located, container = child
    return located, len(path)


def _child_node(node: yaml.Node, entry: Any) -> tuple[yaml.Node, yaml.Node] | None:
    """Return ``(node to report, node to descend into)`` for ``entry`` under ``node``."""
    if isinstance(node, yaml.MappingNode):
        # The last match wins, as in PyYAML's construction (merge keys come first).
        for key_node, value_node in reversed(node.value):
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(entry):
                return key_node, value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(entry, int):
        if -len(node.value) <= entry < len(node.value):
            item = node.value[entry]
            return item, item
    return None


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_REPR else text[: _MAX_VALUE_REPR - 3] + "..."


# --------------------------------------------------------------------------- allowed keys


def _allowed_keys(model_cls: type[BaseModel], loc: Loc) -> list[str] | None:
    """Keys accepted by the model reached from ``model_cls`` along ``loc``.

    Args:
        model_cls: The top-level model.
        loc: Pydantic loc of the mapping that holds an unknown key (union tags included,
            as they help pick the union member).

    Returns:
        The keys as written in YAML (aliases where set), or None if no model is found.
    """
    for model in _models_at(model_cls, loc):
        return [_input_key(name, field) for name, field in model.model_fields.items()]
    return None


def _models_at(tp: Any, loc: Loc) -> Iterable[type[BaseModel]]:
    """Yield the BaseModel classes that ``tp`` can be at the end of ``loc``, best first."""
    tp = _unwrap_annotated(tp)
    if _is_union(tp):
        yield from _models_in_union(tp, loc)
        return
    if not loc:
        if _is_model(tp):
            yield tp
        return
    entry, rest = loc[0], loc[1:]
    if _is_model(tp):
        field = _field_for_key(tp, entry)
        # Not a field: a tag such as 'function-after[...]' that pydantic put in the loc.
        yield from _models_at(field.annotation, rest) if field else _models_at(tp, rest)
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None or not args:
        return
    if entry == "[key]":
        return
    if isinstance(origin, type) and issubclass(origin, Mapping):
        yield from _models_at(args[-1], rest)
    elif isinstance(origin, type) and issubclass(origin, (Sequence, set, frozenset)):
        if not isinstance(entry, int):  # a union tag such as 'list[A]', not an index
            yield from _models_at(tp, rest)
        elif origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if 0 <= entry < len(args):
                yield from _models_at(args[entry], rest)
        else:
            yield from _models_at(args[0], rest)


def _models_in_union(tp: Any, loc: Loc) -> Iterable[type[BaseModel]]:
    members = [m for m in typing.get_args(tp) if m is not type(None)]
    if loc:
        tagged = [m for m in members if _member_matches_tag(m, loc[0])]
        if len(tagged) == 1:
            yield from _models_at(tagged[0], loc[1:])
            return
    for member in members:
        yield from _models_at(member, loc)


def _member_matches_tag(member: Any, tag: Any) -> bool:
    """Whether ``tag`` names this union member: its class name or a discriminator value."""
    member = _unwrap_annotated(member)
    if not _is_model(member):
        return False
    if _clean_tag(tag) == member.__name__:
        return True
    return any(
        typing.get_origin(_unwrap_annotated(f.annotation)) is typing.Literal
        and tag in typing.get_args(_unwrap_annotated(f.annotation))
        for f in member.model_fields.values()
    )


def _field_for_key(model: type[BaseModel], key: Any) -> Any:
    for name, field in model.model_fields.items():
        if key in (name, _input_key(name, field)):
            return field
    return None


def _input_key(name: str, field: Any) -> str:
    alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
    return alias if isinstance(alias, str) else name


def _unwrap_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def config_and_overrides(args: list[str], default: str) -> tuple[str, list[str]]:
    """A job's positional arguments `[CONFIG.yaml] [key.path=value ...]` -> (config path, overrides)."""
    config = args[0] if args and "=" not in args[0] else str(default)
    return config, [a for a in args if "=" in a]
