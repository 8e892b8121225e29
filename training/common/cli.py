"""Command lines generated from one configuration dataclass per command.

Each dataclass field becomes a kebab-case flag (``num_envs`` -> ``--num-envs``) whose help
string comes from the field's metadata: ``field(default=..., metadata={"help": "...", "unit": "m"})``.
The parsed values are the dataclass, and the dataclass is what ``config.json`` records.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from training.common.errors import EXIT_USER_ERROR, UserError

C = TypeVar("C")


def config_field(
    default: Any, help: str, unit: str | None = None, metavar: str | None = None, **kwargs: Any
) -> Any:
    """A dataclass field carrying the help string (and unit) its command-line flag shows;
    ``metavar`` names the value in ``--help`` (default: the type, e.g. ``INT``)."""
    metadata = {"help": help}
    if unit:
        metadata["unit"] = unit
    if metavar:
        metadata["metavar"] = metavar
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


class _OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit code 2 (no usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _base_type(annotation: Any) -> tuple[type, bool]:
    """Return (scalar type, optional?) for annotations like ``int``, ``float | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported field type {annotation}")
        return args[0], True
    return annotation, False


def _parse_optional(scalar: type) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("none", "null", ""):
            return None
        return scalar(text)

    parse.__name__ = scalar.__name__
    return parse


def build_parser(config_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one flag per field of the dataclass ``config_cls``."""
    parser = _OneLineParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(config_cls)
    # keyword-only fields (mixins shared by several commands, e.g. the simulator flags) come last
    for field in sorted(dataclasses.fields(config_cls), key=lambda f: f.kw_only):
        if not field.init or field.metadata.get("cli") is False:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if unit := field.metadata.get("unit"):
            help_text = f"{help_text} [{unit}]"
        scalar, optional = _base_type(hints[field.name])
        kwargs: dict[str, Any] = {"help": help_text, "dest": field.name}
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
            kwargs["default"] = argparse.SUPPRESS  # no "(default: None)" in --help
        else:
            kwargs["default"] = (
                field.default if field.default is not dataclasses.MISSING else field.default_factory()
            )
        if scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _parse_optional(scalar) if optional else scalar
            kwargs["metavar"] = field.metadata.get("metavar", scalar.__name__.upper())
        if choices := field.metadata.get("choices"):
            kwargs["choices"] = choices
        parser.add_argument(flag, **kwargs)
    return parser


def parse_config(config_cls: type[C], argv: Sequence[str] | None, prog: str, description: str) -> C:
    """Parse ``argv`` into ``config_cls`` and run its ``validate()`` if it has one.

    Raises:
        SystemExit(2): on a malformed flag (one line on stderr).
        UserError: when ``validate()`` rejects a value.
    """
    parser = build_parser(config_cls, prog, description)
    namespace = parser.parse_args(argv)
    config = config_cls(**vars(namespace))
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def require(condition: bool, message: str) -> None:
    """Raise a ``UserError`` with ``message`` unless ``condition`` holds (for ``validate()``)."""
    if not condition:
        raise UserError(message)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The dataclass as plain JSON-ready data."""
    return dataclasses.asdict(config)


def console_script(main: typing.Callable[[], object]) -> typing.Callable[[], None]:
    """``main`` as a console-script entry point (``[project.scripts]``): a command's ``main``
    returns its results for Python callers, which must not become the process's exit status."""

    def run() -> None:
        main()

    run.__doc__ = main.__doc__
    return run
