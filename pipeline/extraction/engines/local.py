"""The local engine (the default): worker processes on this host decode, ahead of the forward passes in this one."""

from __future__ import annotations

import itertools

from pipeline.backbones.batchnorm import folded
from pipeline.backbones.build import create_extractor
from pipeline.extraction.engines.base import Engine
from pipeline.extraction.shards import (
    ShardJob,
    decoded_batches,
    decoding_inputs,
    extraction_bar,
    pads_short_batches,
    run_shard,
)


class LocalEngine(Engine):
    """This process runs the model; the decoder the settings name decodes (worker processes or this GPU)."""

    name = "local"

    def start(self, settings, weights, taps: tuple[str, ...], manifest: dict, session=None):
        extractor = create_extractor(settings.backbone, weights, taps, settings.pooling, settings.image_size,
                                     settings.precision, fold=folded(manifest))

        def run(jobs, manifest, class_names, done):
            return run_local(jobs, settings, extractor, manifest, class_names, done)
        return extractor.map_shapes, run


def run_local(jobs: list[ShardJob], settings, extractor, manifest: dict, class_names, done: int = 0) -> int:
    """One decoding stream across all the jobs, ahead of the forward passes in this process.

    Returns:
        The number of images decoded.
    """
    chunks = [job.chunks(settings.batch_size) for job in jobs]
    bar = extraction_bar(jobs, done, settings.progress)
    batches = decoded_batches(*decoding_inputs(jobs), [c for job_chunks in chunks for c in job_chunks], settings)
    pad_to = settings.batch_size if pads_short_batches() else None
    try:
        return sum(run_shard(job, itertools.islice(batches, len(job_chunks)), extractor, manifest, class_names,
                             settings.store_dtype, pad_to, bar.update)
                   for job, job_chunks in zip(jobs, chunks))
    finally:
        batches.close()
        bar.close()
