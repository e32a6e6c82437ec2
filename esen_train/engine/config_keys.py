"""The config keys, with types, defaults and descriptions, made from the dataclasses.

`esen-train fit --help` prints `config_keys_help()`. Everything in it is read from
`TrainConfig` and the dataclasses it holds (esen_train/engine/config.py,
esen_train/model/config.py): the key and default from the dataclass fields, the type as
written in the annotation, and the description from the field's comment in the source (the
comment on its line, else the comment lines right above it). A new field shows up by itself.
A dataclass that several fields share (StageConfig for `direct` and `conservative`) is listed
once, as `<stage>.KEY`.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass

from esen_train.engine.config import TrainConfig


@dataclass
class ConfigKey:
    key: str
    type: str
    default: str
    description: str


def config_keys(schema: type = TrainConfig, prefix: str = "") -> list[ConfigKey]:
    """Every key of `schema`, nested dataclasses expanded into dotted keys."""
    annotations, comments = _annotations_and_comments(schema)
    types = typing.get_type_hints(schema)
    shared = _shared_dataclass_fields(schema, types)
    keys, listed = [], set()
    for field in dataclasses.fields(schema):
        kind = types[field.name]
        if dataclasses.is_dataclass(kind):
            if kind in shared:
                if kind in listed:
                    continue
                listed.add(kind)
                names = ", ".join(shared[kind])
                placeholder = "<" + kind.__name__.removesuffix("Config").lower() + ">"
                keys.append(ConfigKey(prefix + placeholder, kind.__name__, "", f"each of: {names}"))
                keys.extend(config_keys(kind, f"{prefix}{placeholder}."))
                continue
            if comments.get(field.name):  # a section of keys, listed itself when it has something to say
                keys.append(ConfigKey(prefix + field.name, annotations[field.name], "", comments[field.name]))
            keys.extend(config_keys(kind, f"{prefix}{field.name}."))
            continue
        keys.append(ConfigKey(prefix + field.name, annotations[field.name], _default_text(field),
                              comments.get(field.name, "")))
    return keys


def config_keys_help(width: int = 120) -> str:
    """The keys as a text table, for an argparse epilog."""
    keys = config_keys()
    key_width = max(len(k.key) for k in keys)
    type_width = max(len(k.type) for k in keys)
    default_width = min(max(len(k.default) for k in keys), 24)
    indent = key_width + type_width + default_width + 8
    lines = ["config keys (in the YAML file, or key=value on the command line); made from the dataclasses in",
             "esen_train/engine/config.py and esen_train/model/config.py:", ""]
    for k in keys:
        head = f"  {k.key:<{key_width}}  {k.type:<{type_width}}  {k.default:<{default_width}}  "
        description = textwrap.wrap(k.description, max(width - indent, 30)) or [""]
        lines.append((head + description[0]).rstrip())
        lines.extend(" " * indent + more for more in description[1:])
    return "\n".join(lines)


def _shared_dataclass_fields(schema: type, types: dict) -> dict[type, list[str]]:
    """Dataclass types held by more than one field of `schema`, with those fields' names."""
    holders: dict[type, list[str]] = {}
    for field in dataclasses.fields(schema):
        if dataclasses.is_dataclass(types[field.name]):
            holders.setdefault(types[field.name], []).append(field.name)
    return {kind: names for kind, names in holders.items() if len(names) > 1}


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value) if not value or value != value.strip() else value
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


def _annotations_and_comments(schema: type) -> tuple[dict[str, str], dict[str, str]]:
    """Each field's annotation as written, and its comment, from the class's source."""
    source = textwrap.dedent(inspect.getsource(schema))
    lines = source.splitlines()
    comments_by_line = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    annotations, comments = {}, {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        annotations[name] = ast.unparse(node.annotation)
        if node.end_lineno in comments_by_line:
            comments[name] = comments_by_line[node.end_lineno]
            continue
        above, line = [], node.lineno - 1
        while line in comments_by_line and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments_by_line[line])
            line -= 1
        comments[name] = " ".join(above)
    return annotations, comments
