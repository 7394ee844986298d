"""Settings fields that carry their own help: one source of defaults, choices and help text.

Each stage's settings are a frozen dataclass whose fields are declared with :func:`option`. The
command line (:mod:`pipeline.cli`) builds its flags from these fields, so a default, a list of
choices or a help text is written once, next to the setting it describes.
"""

from __future__ import annotations

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
