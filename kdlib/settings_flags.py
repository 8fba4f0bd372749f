"""Command-line flags generated from a typed settings model, so a new field is on the command line without a
second edit.

Each field of a pydantic model becomes `--field-name` (underscores as dashes): its default, its help (the
field's description, with the default), its choices (a Literal's values). A value is checked by the field's
own type and constraints when it is parsed, so a bad one is an argparse error naming the flag
(`argument --max-batch-size: invalid value '0': Input should be greater than or equal to 1`). A bool
field is a switch: `--name` when it defaults to false, `--name` / `--no-name` when it defaults to true.
Cross-field rules stay with the model: validate `flag_values(...)` into it.
"""

from __future__ import annotations

import argparse
import typing
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel],
              skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `model` (except `skip`) on a parser or an argument group; the parsed value lands
    under the field's name."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        _check_scalar(model, name, field.annotation)
        flag, required = flag_name(name), field.is_required()
        default = None if required else field.get_default(call_default_factory=True)
        shown = "" if required or default is None or default is False else f" (default: {default})"
        help_text = ((field.description or "") + shown).replace("%", "%%")  # argparse %-formats help
        if field.annotation is bool:  # a switch
            action = "store_true" if default is False else argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=name, action=action, default=default, required=required, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=_parser(flag, field), default=default, required=required,
                                choices=_literal_values(field.annotation), help=help_text)


def flag_values(namespace: argparse.Namespace, model: type[BaseModel], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed values of `model`'s fields (except `skip`), ready for `model.model_validate`."""
    return {name: getattr(namespace, name) for name in model.model_fields if name not in skip}


def _parser(flag: str, field: FieldInfo):
    """A command-line string -> the field's value, validated by the field's type and constraints."""
    adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as e:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: "
                                             + "; ".join(err["msg"] for err in e.errors())) from None

    parse.__name__ = flag  # argparse names the converter in some of its messages
    return parse


def _check_scalar(model: type[BaseModel], name: str, annotation: Any) -> None:
    """One command-line word holds one value: a nested model or a container cannot be a flag (skip it)."""
    for tp in (annotation, *typing.get_args(annotation)):
        origin = typing.get_origin(tp) or tp
        if isinstance(origin, type) and issubclass(origin, (BaseModel, list, tuple, set, dict)):
            raise TypeError(f"{model.__name__}.{name} ({annotation}) cannot be a command-line flag; skip it")


def _literal_values(annotation: Any) -> list | None:
    return list(typing.get_args(annotation)) if typing.get_origin(annotation) is typing.Literal else None
