"""Where ``--decoder dali``'s time goes (bench/NOTES.md, "DALI on an H100").

On a CUDA machine with DALI (the profile the NOTES quote; 256-image batches of the given JPEGs, the
folder repeated 16 times, from the page cache):

- ``stream_ahead<n>_img_s`` / ``stream_ahead<n>_thread_ms``: :meth:`DaliDecoder.batches` with the
  scan's JPEG facts, as the extraction drives it, with ``n`` chunks queued in DALI ahead of the one
  handed over: images/s, and the CPU time per batch of the thread that drives it (the Python work
  left to share the GIL with the forward passes);
- ``native_<load>_img_s``: DALI reading the files itself with its own reader (``fn.readers.file``) at
  that ``hw_decoder_load``: what DALI does on this GPU with no Python at all;
- ``parity_*``: DALI's pixels against Pillow's full-resolution decode, and Pillow's draft decode against it.

``--host-overhead`` (any machine, DALI's CPU device): the same stream over 256 tiny JPEGs a batch, where
decoding is a small part: wall and driving-thread CPU milliseconds per batch, and for a one-batch call
without the scan's facts (each file read in Python to find them).

    KERAS_BACKEND=jax python -m bench.dali_profile --data DIR
    KERAS_BACKEND=jax python -m bench.dali_profile --host-overhead [--batches 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 256


def streamed(decoder, files: list, repeats: int) -> tuple[float, float]:
    """``(images/s, driving-thread CPU ms per batch)`` of ``decoder.batches`` over ``files`` repeated, in chunks of
    :data:`BATCH`, with the stats and JPEG facts a scan gives (as an extraction); the first chunk not timed."""
    from pipeline.data.scan import file_stat, probe_file

    paths = files * repeats
    stats = [file_stat(file)[:2] for file in files] * repeats
    jpegs = [probe_file(file)[0].jpeg for file in files] * repeats
    chunks = [(a, min(a + BATCH, len(paths))) for a in range(0, len(paths), BATCH)]
    batches = decoder.batches(paths, chunks, stats, jpegs)
    next(batches)
    wall, cpu = time.perf_counter(), time.thread_time()
    for _, pixels, _ in batches:  # noqa: B007 - the last batch is read after the loop
        pass
    if hasattr(pixels, "block_until_ready"):
        pixels.block_until_ready()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return (chunks[-1][1] - chunks[0][1]) / wall, cpu / (len(chunks) - 1) * 1e3


def host_overhead(batches: int) -> dict:
    """Milliseconds per batch of 256 16x16 JPEGs through :class:`DaliDecoder`, DALI's CPU device."""
    from PIL import Image

    from pipeline.data.dali_decode import DaliDecoder

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(BATCH):
            pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            files.append(Path(tmp) / f"{i}.jpg")
            Image.fromarray(pixels).save(files[-1])
        decoder = DaliDecoder(8, batch_size=BATCH, device="cpu", workers=2)
        rate, thread_ms = streamed(decoder, files, batches + 1)
        decoder(files)
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(batches):
            decoder(files)
        call_ms, call_thread_ms = ((time.perf_counter() - wall) * 1e3 / batches,
                                   (time.thread_time() - cpu) * 1e3 / batches)
        decoder.close()
    return {"host_ms_per_batch": BATCH / rate * 1e3, "thread_ms_per_batch": thread_ms, "call_ms": call_ms,
            "call_thread_ms": call_thread_ms, "images": BATCH, "batches": batches}


def gpu_profile(data: Path) -> dict:
    """The profile on a CUDA machine (see the module docstring)."""
    from nvidia.dali import fn, pipeline_def, types

    from bench.gpu import list_images
    from pipeline.data.dali_decode import DaliDecoder
    from pipeline.data.decoding import decode_image

    files = list_images(data)
    res = {}
    for ahead in (0, 1, 2, 4):
        decoder = DaliDecoder(224, batch_size=BATCH, workers=16, ahead=ahead)
        res[f"stream_ahead{ahead}_img_s"], res[f"stream_ahead{ahead}_thread_ms"] = streamed(decoder, files, 16)
        decoder.close()
    some = files[:: max(1, len(files) // BATCH)][:BATCH]
    decoder = DaliDecoder(224, batch_size=BATCH, workers=16)
    got = np.asarray(decoder(some)[0]).astype(int)
    decoder.close()
    full = np.stack([decode_image(p, 224, draft=False) for p in some]).astype(int)
    draft = np.stack([decode_image(p, 224, draft=True) for p in some]).astype(int)
    res["parity_mean"] = float(np.abs(got - full).mean())
    res["parity_max"] = int(np.abs(got - full).max())
    res["pillow_draft_vs_full_mean"] = float(np.abs(draft - full).mean())
    for load in (0.65, 1.0):
        @pipeline_def(batch_size=BATCH, num_threads=16, device_id=0)
        def native():
            jpegs, _ = fn.readers.file(files=[str(p) for p in files * 16])
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB,
                                        hw_decoder_load=load)  # noqa: B023 - built and run in this iteration
            return fn.resize(images, size=[224, 224], interp_type=types.INTERP_LINEAR, antialias=True,
                             dtype=types.UINT8)

        pipe = native()
        pipe.build()
        pipe.run()
        started = time.perf_counter()
        for _ in range(40):
            pipe.run()
        res[f"native_{load}_img_s"] = BATCH * 40 / (time.perf_counter() - started)
        del pipe
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a folder of class folders of JPEGs (the GPU profile)")
    parser.add_argument("--host-overhead", action="store_true", help="the CPU-device host time per batch instead")
    parser.add_argument("--batches", type=int, default=100, help="timed calls for --host-overhead (default 100)")
    args = parser.parse_args()
    if not (args.host_overhead or args.data):
        parser.error("give --data DIR (on a GPU machine) or --host-overhead")
    print(json.dumps(host_overhead(args.batches) if args.host_overhead else gpu_profile(Path(args.data))))


if __name__ == "__main__":
    main()
