"""One options object per command: a dataclass whose fields hold each option's default and help once.

argparse parsers and doit task parameters are both built from it, so the two front doors cannot drift:

    @dataclass
    class ConvertOptions:
        max_input_len: int = option(16, "tokens per prefill step (T)")

    add_arguments(parser, ConvertOptions)          # --max_input_len N (default: 16)
    doit_params(ConvertOptions)                    # [{"name": "max_input_len", "type": int, "default": 16, ...}]
    ConvertOptions(**values_from_parser_or_doit)
    to_argv(ConvertOptions, values)                # back to --max_input_len 8 ... (the options not at their default)
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from pipeline.core.errors import StagepipeError


def option(default, help: str, *, parse=None, choices=None, flag: str | None = None, short: str | None = None):
    """A dataclass field that is also a command-line option. parse: str -> value (default: from the field's
    type); choices: the allowed values; flag: the option's name when it differs from the field's; short: a
    one-letter alias (-n)."""
    meta = {"help": help, "parse": parse, "choices": choices, "flag": flag, "short": short}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def int_list(text: str) -> list[int]:
    """"7,7,7,7" -> [7, 7, 7, 7]"""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 7,7,7,7, got {text!r}") from None


def _fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            yield f, hints[f.name]


def _base_type(hint):
    """int for int | None, Path for Path | None, ..."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


def _parser_of(f, hint):
    if f.metadata["parse"]:
        return f.metadata["parse"]
    base = _base_type(hint)
    return base if base in (int, float, str, Path) else str


def _default_of(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_arguments(parser: argparse.ArgumentParser, cls, skip=(), required=()):
    """One --option per field of cls (booleans are flags); the help shows each default."""
    for f, hint in _fields(cls):
        if f.name in skip:
            continue
        names = ["--" + (f.metadata["flag"] or f.name)] + ([f"-{f.metadata['short']}"] if f.metadata["short"] else [])
        default, help_text = _default_of(f), f.metadata["help"]
        if _base_type(hint) is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        shown = f" (default: {default})" if default not in (None, "", []) else ""
        parser.add_argument(*names, dest=f.name, type=_parser_of(f, hint), default=default,
                            choices=f.metadata["choices"], required=f.name in required, help=help_text + shown)


def doit_params(cls, skip=()) -> list[dict]:
    """doit task parameters for the fields of cls, defaults and help included."""
    params = []
    for f, hint in _fields(cls):
        if f.name in skip:
            continue
        default = _default_of(f)
        is_bool = _base_type(hint) is bool
        shown = f" (default: {default})" if default not in (None, "", [], False) else ""
        param = {"name": f.name, "long": f.metadata["flag"] or f.name, "default": default,
                 "type": bool if is_bool else _parser_of(f, hint), "help": f.metadata["help"] + shown}
        if f.metadata["short"]:
            param["short"] = f.metadata["short"]
        params.append(param)
    return params


def from_values(cls, values: dict):
    """cls(**values) for the fields cls has; a choice outside its list is one clear error."""
    known = {f.name: f for f, _ in _fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in known}
    for name, value in kwargs.items():
        choices = known[name].metadata["choices"]
        if choices and value not in choices:
            raise StagepipeError(f"--{known[name].metadata['flag'] or name} {value}: choose one of "
                                 f"{', '.join(map(str, choices))}")
    return cls(**kwargs)


def to_argv(cls, values: dict) -> list[str]:
    """The command-line flags that give these values: --name value for each one that differs from its default
    (a True boolean as a plain flag, a list comma-separated); names cls does not have are an error."""
    known = {f.name: f for f, _ in _fields(cls)}
    argv = []
    for name, value in values.items():
        if name not in known:
            raise StagepipeError(f"{name}: not an option of {cls.__name__}")
        if value == _default_of(known[name]):
            continue
        flag = "--" + (known[name].metadata["flag"] or name)
        if value is True or value is False:
            argv += [flag] if value else []
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def utf8_text(text: str, what: str) -> str:
    """text as given on a command line: bytes that are not UTF-8 arrive as lone surrogates; refuse them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise StagepipeError(f"{what}: not UTF-8 text (a byte at position {e.start} is not); give UTF-8") from None
    return text
