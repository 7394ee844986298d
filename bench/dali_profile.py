"""Where ``--decoder dali``'s time goes, batch by batch (bench/NOTES.md, "DALI on an H100").

On a CUDA machine with DALI (the profile the NOTES quote; 256-image batches of the given JPEGs, the
folder repeated 16 times, from the page cache):

- ``read_tasks_ms`` / ``read_thread_ms``: reading a batch's files as one thread task each on 16 threads,
  against one after another in one thread (what :func:`pipeline.gpu_decode.read_and_route` does);
- ``route_ms``: :func:`pipeline.gpu_decode.read_and_route` (read, header, end marker);
- ``dali_only_img_s``: DALI fed already-read batches, one run at a time (:class:`DaliDecoder`'s own work);
- ``calls_<n>thr_img_s``: whole decoder calls from ``n`` threads, as the extraction makes them;
- ``native_<load>_img_s``: DALI reading the files itself (``fn.readers.file``) at that ``hw_decoder_load``:
  what DALI can do on this GPU with no Python per file;
- ``parity_*``: DALI's pixels against Pillow's full-resolution decode, and Pillow's draft decode against it.

``--host-overhead`` (any machine, DALI's CPU device): the host time of one decoder call over 256 tiny
JPEGs, where decoding is a small part; the figure the per-batch Python work is judged by without a GPU.

    KERAS_BACKEND=jax python -m bench.dali_profile --data DIR
    KERAS_BACKEND=jax python -m bench.dali_profile --host-overhead [--batches 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

BATCH = 256


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one untimed."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def host_overhead(batches: int) -> dict:
    """Milliseconds of one :class:`DaliDecoder` call on 256 16x16 JPEGs, DALI's CPU device."""
    from PIL import Image

    from pipeline.dali_decode import DaliDecoder

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(BATCH):
            pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            paths.append(Path(tmp) / f"{i}.jpg")
            Image.fromarray(pixels).save(paths[-1])
        decoder = DaliDecoder(8, batch_size=BATCH, device="cpu", workers=2)
        seconds = _timed(lambda: decoder(paths), batches)
        decoder.close()
    return {"host_ms_per_batch": seconds * 1e3, "images": BATCH, "batches": batches}


def gpu_profile(data: Path) -> dict:
    """The profile on a CUDA machine (see the module docstring)."""
    from nvidia.dali import fn, pipeline_def, types

    from bench.gpu import list_images
    from pipeline.dali_decode import DaliDecoder
    from pipeline.decoding import decode_image
    from pipeline.gpu_decode import read_and_route
    from pipeline.images import or_reason, ordered_map, read_file

    files = list_images(data)
    paths = files * 16
    chunks = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)][:33]
    res = {}
    with ThreadPoolExecutor(16) as pool:
        res["read_tasks_ms"] = _timed(lambda: list(pool.map(partial(or_reason, read_file), chunks[0])), 20) * 1e3
    res["read_thread_ms"] = _timed(lambda: [or_reason(read_file, p) for p in chunks[0]], 20) * 1e3
    res["route_ms"] = _timed(lambda: read_and_route(chunks[0], None, 10**9), 20) * 1e3
    decoder = DaliDecoder(224, batch_size=BATCH, workers=16)
    routed = [read_and_route(chunk, None, 10**9) for chunk in chunks[:20]]
    items = [[(i, blobs[i], header) for i, header in jpegs] for blobs, _, jpegs, _ in routed]
    decoder._run(items[0])
    started = time.perf_counter()
    for batch in items:
        decoder._run(batch)
    res["dali_only_img_s"] = sum(map(len, items)) / (time.perf_counter() - started)
    for threads in (1, 2, 3):
        started = time.perf_counter()
        for pixels, _ in ordered_map(decoder, chunks[1:], threads, prefetch=threads + 1):
            pass
        pixels.block_until_ready()
        res[f"calls_{threads}thr_img_s"] = BATCH * (len(chunks) - 1) / (time.perf_counter() - started)
    some = files[:: max(1, len(files) // BATCH)][:BATCH]
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
            jpegs, _ = fn.readers.file(files=[str(p) for p in paths])
            images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=load)
            return fn.resize(images, size=[224, 224], interp_type=types.INTERP_LINEAR, antialias=True,
                             dtype=types.UINT8)

        pipe = native()
        pipe.build()
        res[f"native_{load}_img_s"] = BATCH / _timed(pipe.run, 40)
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
