"""What every engine declares (:mod:`pipeline.extraction.engines` says what each part is for)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class NoOptions:
    """An engine without settings of its own."""


class Engine:
    """Defaults for an engine: decodes on this host, no session, no options."""

    name = ""
    Options = NoOptions
    decodes_here = True
    summary = ""  # how the timing line says where the work ran, e.g. " on Ray"

    def session(self, options):
        return contextlib.nullcontext(None)

    def start(self, settings, weights, taps: tuple[str, ...], manifest: dict, session):
        raise NotImplementedError
