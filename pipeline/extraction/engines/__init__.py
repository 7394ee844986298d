"""Engines: where stage one's shards are computed. Each is one module here and one entry in :data:`ENGINES`.

An engine is a short driver of the shard seam (:mod:`pipeline.extraction.shards`: plan, run, merge); it
changes where the work runs, never the numbers, the store or its key. It declares:

- ``name``, the ``--engine`` value, and ``Options``, a frozen dataclass of its own settings whose fields
  are declared with :func:`pipeline.core.settings.option` (so they become flags, e.g. ``--ray-address``);
- ``decodes_here``: whether decoding runs on this host, so that ``--decoder auto`` may pick this host's
  GPU decoder and a named decoder is checked here (else on the workers);
- ``session(options)``: a context manager held for one command (a cluster connection, made when first
  needed), or None; a session with a ``probe(root, paths)`` method hashes a first scan's files remotely;
- ``start(settings, weights, taps, manifest, session)``: builds what it runs (a model, an actor pool) and
  returns ``(map_shapes, run)``, where ``run(jobs, manifest, class_names, done)`` commits the shard jobs
  and returns the number of images decoded.

A Spark or Dask engine is one new module beside :mod:`local` and :mod:`ray`, added to :data:`ENGINES`.
"""

from __future__ import annotations

from pipeline.extraction.engines.local import LocalEngine
from pipeline.extraction.engines.ray import RayEngine

ENGINES = {engine.name: engine for engine in (LocalEngine(), RayEngine())}


def get_engine(name: str):
    """The engine registered as ``name``.

    Raises:
        ValueError: the name is not registered; the message lists the registered ones.
    """
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"engine={name!r} is not known; use one of: {', '.join(ENGINES)}") from None
