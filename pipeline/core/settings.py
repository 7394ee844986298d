"""Settings fields that carry their own help, and the command-line flags built from them.

Each stage's settings are a frozen dataclass whose fields are declared with :func:`option`. The
command line (:mod:`pipeline.cli`) builds its flags from these fields (:func:`add_settings_options`)
and the settings from the parsed flags (:func:`settings_from_args`), so a default, a list of
choices or a help text is written once, next to the setting it describes. String parsing (comma
lists) happens here, on the command line's side; the library takes typed values.
"""

from __future__ import annotations

import argparse
import dataclasses


def option(default, help: str, *, flag: str | None = None, choices=None, metavar: str | None = None,
           group: str | None = None, cli: bool = True, flag_help: str | None = None):
    """A dataclass field with command-line metadata.

    Args:
        default: The default (a list or dict default is not allowed; use a tuple).
        help: What the setting does; ``(default: ...)`` is added on the command line.
        flag: The command-line flag (default: ``--`` and the name with dashes).
        choices: The accepted values, where there is a closed list.
        metavar: How the value is shown in ``--help``.
        group: The ``--help`` section the flag is listed in.
        cli: False for settings that have no flag.
        flag_help: For a switch (a bool whose flag turns it off), what the flag does.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar, "group": group, "cli": cli, "flag_help": flag_help})


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError`` naming the setting, the value and the accepted ones."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; use one of: {', '.join(map(str, choices))}")


def check_int(settings, names_and_lows) -> None:
    """Raise ``ValueError`` unless each named field is an integer at least its low bound."""
    for name, low in names_and_lows:
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= {low}")


def split_list(text: str) -> tuple[str, ...]:
    """``a,b:{"x": 1, "y": 2},c`` -> ``("a", 'b:{"x": 1, "y": 2}', "c")``: commas outside JSON braces split."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return tuple(item for item in items if item)


def _flags(f: dataclasses.Field) -> list[str]:
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    if f.type == "bool" and f.default is True and not f.metadata.get("flag"):
        flag = "--no-" + f.name.replace("_", "-")
    return ["-q", flag] if flag == "--quiet" else [flag]


def _dest(f: dataclasses.Field) -> str:
    """Where argparse keeps a field's value: the flag's name (two settings classes that share a flag share
    it); a switch keeps the field's own name."""
    return f.name if f.type == "bool" else _flags(f)[-1].lstrip("-").replace("-", "_")


def add_settings_options(parser: argparse.ArgumentParser, *classes, added: set | None = None) -> set:
    """Add a flag for every field of the settings ``classes`` (see :func:`pipeline.core.settings.option`).

    Defaults, choices and help come from the fields. A flag already added (``added``) is not added
    again: ``--seed`` of extraction and fine-tuning is one flag.
    """
    added = set() if added is None else added
    # sections the parser already has (--store's "stage two") are added to, not repeated
    groups: dict[str, argparse._ArgumentGroup] = {group.title: group for group in parser._action_groups}
    for cls in classes:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta.get("cli", False) or _flags(f)[-1] in added:
                continue
            flags = _flags(f)
            added.add(flags[-1])
            title = meta.get("group") or "general"
            group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
            help_text = meta["help"]
            if f.type == "bool":
                group.add_argument(*flags, dest=f.name, action="store_false" if f.default else "store_true",
                                   help=meta.get("flag_help") or help_text)
                continue
            kind = {"int": int, "float": float, "float | None": float}.get(f.type, str)
            if f.type.startswith("tuple"):
                kind = split_list
            shown = f.default if not isinstance(f.default, tuple) else ",".join(f.default)
            if shown not in (None, "", ()) and "(default:" not in help_text:
                help_text += f" (default: {shown})"
            group.add_argument(*flags, dest=_dest(f), type=kind, default=f.default, choices=meta.get("choices"),
                               metavar=meta.get("metavar"), help=help_text)
    return added


def settings_from_args(cls, args: argparse.Namespace, **values):
    """Build the settings ``cls`` from parsed flags; ``values`` set the fields that have no flag."""
    for f in dataclasses.fields(cls):
        if f.name not in values and f.metadata.get("cli", False) and hasattr(args, _dest(f)):
            values[f.name] = getattr(args, _dest(f))
    return cls(**values)
