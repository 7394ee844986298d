"""GPU benchmark: ours against a tuned PyTorch pipeline and the forward-only ceiling (``make bench-gpu``).

Runs on a CUDA machine with torch, torchvision and JAX; Keras runs on JAX (``KERAS_BACKEND=jax``,
TensorFlow is not needed). Every measurement runs in its own process, on the same files, at
224 px and batch 256, for VGG16 (to ``block5_pool``) and ResNet50 (to ``conv5_block3_out``),
global average pooled:

- ``ceiling``: the torchvision network's forward pass alone, bfloat16 and channels-last, on
  batches already on the GPU (the rate no pipeline over the same network can beat).
- ``torch``: the tuned PyTorch pipeline: ``DataLoader`` with one worker process per core
  decoding and resizing with Pillow, pinned memory, then the ``ceiling`` network; the features are
  saved with ``np.save``. ``torch-draft`` is the same with Pillow's JPEG draft mode.
- ``keras-forward``: our extractor (Keras on JAX, bfloat16) on uint8 batches from host memory:
  our forward-pass ceiling.
- ``ours-pillow`` / ``ours-nvjpeg`` / ``ours-dali``: ``pipeline.extraction.extract.extract_features`` end to
  end, from the JPEG files to an HDF5 store, decoding in worker processes on the CPU or on the GPU.
  Each records ``forward_s`` (the main process starting forward passes and waiting for their features)
  and ``wait_s`` (waiting for the next decoded batch). ``-fold`` (ResNet50): BatchNormalization folded
  on JAX too; ``-ahead2``: two forward passes in flight instead of one (``pipeline.extraction.shards.IN_FLIGHT``).
- ``pillow`` / ``nvjpeg`` / ``dali``: a decoder alone (decode + resize, no network): one
  :class:`pipeline.data.decoding.ProcessDecoder` process per host core, :class:`pipeline.data.gpu_decode.NvjpegDecoder`,
  :class:`pipeline.data.dali_decode.DaliDecoder`. ``dali@0.9`` (``--dali-hw-loads 0.9,...``): DALI with that share
  of each batch on the hardware JPEG engines instead of ours, 1.0.
- ``scan``: a cache-hit rerun's scan of the same files with the stat cache against reading and
  hashing every file (``bench.scan``), on this host's cores.

Weights: seeded random for ours and torchvision's default initialisation for the peers (no
network here; speed does not depend on the weights). The data set is the given image folder
repeated (hard links) to ``--images`` files so the runs last seconds, read once beforehand so all
come from the page cache. An end-to-end or decoder row's rate is over the second half of its images
(:class:`Timeline`): from the batch that completes the first half to the last one. Counting from the
first batch instead credited a pipeline with what it decoded ahead while its first forward pass
compiled: the peer's ``DataLoader`` holds 64 batches ahead (16 workers x ``prefetch_factor`` 4), all
16,384 images, and its first batch came 2.6-3.7 s after its start (bench/NOTES.md). The torch
pipelines also run their network once before the loader starts. ``after_first_per_s`` keeps the old
figure; ``wall_s`` is the whole child, start-up and compilation included.

    KERAS_BACKEND=jax python -m bench.gpu --data DIR [--images 16384] [--backbones vgg16,resnet50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, emit, link, machine, run_child
from bench.scan import compare
from pipeline.backbones.registry import get_backbone

BATCH = 256
SIZE = 224
DEVICE = "cuda"  # "cpu" only for a smoke run of the script on a machine without a GPU
TAPS = {"vgg16": "block5_pool", "resnet50": "conv5_block3_out"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def list_images(data: Path) -> list[Path]:
    return sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def torch_trunk(name: str, compile_: bool = False):
    """torchvision's network up to the tap, bfloat16, channels-last, eval, on the GPU."""
    import torch
    import torchvision

    if name == "vgg16":
        trunk = torchvision.models.vgg16().features
    else:
        trunk = torch.nn.Sequential(*list(torchvision.models.resnet50().children())[:-2])
    trunk = trunk.eval().to(DEVICE, memory_format=torch.channels_last, dtype=torch.bfloat16)
    return torch.compile(trunk) if compile_ else trunk


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Timeline:
    """When each batch of a pipeline's output was complete: ``mark(n)`` after a batch of ``n`` images."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []  # (time, images done so far)

    def mark(self, n: int) -> None:
        self.marks.append((time.perf_counter(), (self.marks[-1][1] if self.marks else 0) + n))

    def rates(self) -> dict:
        """``images_per_s`` over the second half of the images (the batches from the one that completes the first
        half to the last: what was decoded ahead during start-up is used up by then), and ``after_first_per_s``,
        from the first batch to the last (what this bench reported before); a rate is None where a pipeline gave one
        batch only (nothing to time)."""
        (t_first, n_first), (t_end, total) = self.marks[0], self.marks[-1]
        t_half, n_half = next(m for m in self.marks if m[1] >= total / 2)
        if t_half == t_end:  # the half is the last batch: time from the first
            t_half, n_half = t_first, n_first

        def rate(images, seconds):
            return images / seconds if seconds > 0 else None

        return {"images": total, "steady_images": total - n_half, "steady_s": t_end - t_half,
                "images_per_s": rate(total - n_half, t_end - t_half),
                "after_first_per_s": rate(total - n_first, t_end - t_first)}


def child_ceiling(args) -> dict:
    import torch

    model = torch_trunk(args.backbone, args.compile)
    inputs = [torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE, dtype=torch.bfloat16)
              .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    with torch.inference_mode():
        for i in range(5):
            model(inputs[i % 2]).mean((2, 3)).float()
        _sync()
        steps = 30
        start = time.perf_counter()
        for i in range(steps):
            model(inputs[i % 2]).mean((2, 3)).float()
        _sync()
        seconds = time.perf_counter() - start
    return {"images": steps * BATCH, "steady_s": seconds}


class _Files:
    def __init__(self, paths, draft, size):
        self.paths, self.draft, self.size = paths, draft, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            if self.draft:
                im.draft("RGB", (self.size, self.size))
            im = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.array(im))


def child_torch(args) -> dict:
    import torch

    paths = list_images(Path(args.data))
    model = torch_trunk(args.backbone)
    mean = torch.tensor(MEAN, device=DEVICE).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=DEVICE).view(1, 3, 1, 1) * 255

    def features(x):
        x = x.to(DEVICE, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - mean) / std).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return model(x).mean((2, 3)).float().cpu()

    with torch.inference_mode():  # the first passes (cuDNN's set-up) before any image is decoded
        for _ in range(2):
            features(torch.zeros((BATCH, SIZE, SIZE, 3), dtype=torch.uint8))
    loader = torch.utils.data.DataLoader(_Files(paths, args.draft, SIZE), batch_size=BATCH,
                                         num_workers=os.cpu_count(), pin_memory=DEVICE == "cuda", prefetch_factor=4)
    done, timeline = [], Timeline()
    start = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            done.append(features(x))
            timeline.mark(len(x))
    np.save(Path(args.out) / "features.npy", torch.cat(done).numpy())
    return {**timeline.rates(), "e2e_s": time.perf_counter() - start}


def child_keras_forward(args) -> dict:
    from pipeline.backbones.build import create_extractor

    model = create_extractor(args.backbone, "random", TAPS[args.backbone], "avg", SIZE, "bfloat16",
                             fold=args.fold_batchnorm).model
    rng = np.random.default_rng(0)
    inputs = [rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]
    for i in range(3):
        model.predict_on_batch(inputs[i % 2])
    steps = 20
    start = time.perf_counter()
    for i in range(steps):
        model.predict_on_batch(inputs[i % 2])
    return {"images": steps * BATCH, "steady_s": time.perf_counter() - start, "precision": "bfloat16"}


def child_ours(args) -> dict:
    import pipeline.extraction.shards as shards
    from pipeline.extraction.extract import ExtractSettings, extract_features

    if args.fold_batchnorm:  # a knob of this bench's -fold rows: extraction folds on TensorFlow and torch only
        import pipeline.backbones.batchnorm as batchnorm
        batchnorm._FASTER_ON = (*batchnorm._FASTER_ON, "jax")
    shards.IN_FLIGHT = args.in_flight  # the -ahead2 rows: forward passes started before the oldest is collected
    timeline, forward_s, wait_s = Timeline(), [0.0], [0.0]
    forward, collect, decoded_batches = shards.forward, shards.collect, shards.decoded_batches

    def waited(*a):  # the main process's time waiting for the next decoded batch
        batches = decoded_batches(*a)
        try:
            while True:
                begin = time.perf_counter()
                batch = next(batches, None)
                wait_s[0] += time.perf_counter() - begin
                if batch is None:
                    return
                yield batch
        finally:
            batches.close()

    def timed(fn):  # the main process's time in starting forward passes and waiting for their features
        def run(*a):
            begin = time.perf_counter()
            result = fn(*a)
            forward_s[0] += time.perf_counter() - begin
            return result
        return run

    timed_collect = timed(collect)

    def collected(extractor, started, outputs):
        timed_collect(extractor, started, outputs)
        timeline.mark(started[0])  # this batch's features are on the host

    shards.forward, shards.collect, shards.decoded_batches = timed(forward), collected, waited
    start = time.perf_counter()
    result = extract_features(ExtractSettings(
        data=args.data, backbone=args.backbone, layers=(TAPS[args.backbone],), weights="random", image_size=SIZE,
        batch_size=BATCH, shard_size=4096, decoder=args.decoder, precision="auto", out_dir=args.out,
        progress=False))
    return {**timeline.rates(), "images": result.n_decoded, "e2e_s": time.perf_counter() - start,
            "timings": result.timings, "decoder": args.decoder, "forward_s": forward_s[0], "wait_s": wait_s[0],
            "in_flight": args.in_flight, "batchnorm": result.store.manifest.batchnorm or "as built"}


def child_decode(args) -> dict:
    """One decoder alone over the files, driven as an extraction drives it (``shards.decoded_batches``:
    worker processes for Pillow, threads ahead for the GPU decoders), timed like the pipelines (:class:`Timeline`)."""
    from contextlib import ExitStack
    from functools import partial
    from types import SimpleNamespace
    from unittest import mock

    from pipeline.data.images import DEFAULT_MAX_PIXELS, find_images
    from pipeline.data.scan import scan_images
    from pipeline.extraction.shards import decoded_batches

    images = scan_images(find_images(Path(args.data)))  # the stats and JPEG facts an extraction decodes with
    paths = [images.root / record.path for record in images.records]
    chunks = [(i, min(i + BATCH, len(paths))) for i in range(0, len(paths), BATCH)]
    settings = SimpleNamespace(decoder=args.decoder, image_size=SIZE, resize="squash", max_pixels=DEFAULT_MAX_PIXELS,
                               batch_size=BATCH, workers=os.cpu_count(), draft=True)
    timeline = Timeline()
    with ExitStack() as knobs:
        if args.hw_decoder_load is not None:  # a knob of this benchmark's rows, not a setting of the extraction,
            # patched in for this call only (tests call it in-process)
            import pipeline.data.dali_decode as dali_decode
            knobs.enter_context(mock.patch.object(dali_decode, "DaliDecoder", partial(
                dali_decode.DaliDecoder, hw_decoder_load=args.hw_decoder_load)))
        batches = decoded_batches(paths, [r.stat for r in images.records], [r.jpeg for r in images.records], chunks,
                                  settings)
        for _, pixels, _ in batches:
            if hasattr(pixels, "block_until_ready"):
                pixels.block_until_ready()
            timeline.mark(len(pixels))
        batches.close()
    return timeline.rates()


CHILDREN = {"ceiling": child_ceiling, "torch": child_torch, "keras-forward": child_keras_forward,
            "ours": child_ours, "decode": child_decode}
DECODE_ONLY = ("pillow", "nvjpeg", "dali")  # rows of a decoder alone: no network, so no ratio to the pipelines


def child_main(argv=None) -> None:
    global SIZE, BATCH, DEVICE
    parser = argparse.ArgumentParser()
    parser.add_argument("child", choices=CHILDREN)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--decoder", default="pillow")
    parser.add_argument("--hw-decoder-load", type=float)
    parser.add_argument("--draft", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fold-batchnorm", action="store_true")
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    args = parser.parse_args(argv)
    SIZE, BATCH = args.size, args.batch_size
    try:
        import torch
        on_gpu = torch.cuda.is_available()
    except ImportError:  # the decoder rows also run on a CPU machine without torch
        on_gpu = False
    if not on_gpu:
        DEVICE = "cpu"
        import pipeline.data.gpu_decode
        pipeline.data.gpu_decode.DEVICE = "cpu"
    result = CHILDREN[args.child](args)
    if "images_per_s" not in result:  # the fixed loops over batches already on hand (ceiling, keras-forward)
        result["images_per_s"] = result["images"] / result["steady_s"]
    emit(result)


def tile(data: Path, n: int, into: Path) -> int:
    """Hard-link the folder's JPEGs (class folders kept) until there are ``n``; read them once."""
    source = list_images(data)
    count = 0
    while count < n:
        for path in source:
            if count == n:
                break
            target = into / path.parent.name / f"r{count // len(source)}_{path.name}"
            link(path, target)
            target.read_bytes()
            count += 1
    return count


def gpu_facts() -> dict:
    facts = machine()
    try:
        import torch
        import torchvision

        facts.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, torchvision=torchvision.__version__)
    except Exception as exc:  # noqa: BLE001 - facts are best effort
        facts["gpu"] = f"unknown ({exc})"
    from importlib import metadata
    for package in ("jax", "keras"):
        try:
            facts[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return facts


def table(rows: list[dict], facts: dict, size: int, batch_size: int) -> str:
    lines = [f"GPU extraction, {size} px, batch {batch_size}, images/s over the second half of the images; "
             f"{facts.get('gpu')}, {facts.get('cpus')} host cores, torch {facts.get('torch')}, "
             f"jax {facts.get('jax')}, keras {facts.get('keras')}; seeded random weights", "",
             "| backbone | pipeline | images/s | vs torch pipeline | vs ceiling | wall s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        rate = {r["name"]: r.get("images_per_s") for r in mine}
        peer = max((rate.get("torch") or 0), (rate.get("torch-draft") or 0)) or None
        ceiling = rate.get("ceiling")
        for r in mine:
            value = r.get("images_per_s")
            if value is None:
                lines.append(f"| {backbone} | {r['name']} | failed: {r.get('error', '')[:60]} | | | |")
                continue
            vs_peer = f"{value / peer:.2f}x" if peer and r["name"] != "ceiling" else ""
            vs_ceiling = f"{value / ceiling:.0%}" if ceiling else ""
            lines.append(f"| {backbone} | {r['name']} | {value:,.0f} | {vs_peer} | {vs_ceiling} | "
                         f"{r.get('process_wall_s', 0):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of class folders of JPEGs")
    parser.add_argument("--images", type=int, default=16384, help="files to run over (the folder repeated)")
    parser.add_argument("--backbones", default="vgg16,resnet50")
    parser.add_argument("--only", default="", help="comma list of measurements to run (default: all)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for gpu-*.json and gpu-latest.md")
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--dali-hw-loads", default="", help="comma list of hw_decoder_load values for more dali rows")
    args = parser.parse_args()
    env = {"KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}
    # (row, child, its flags); a -fold row folds BatchNormalization on JAX too, for backbones that have it (ResNet50).
    fold = ["--fold-batchnorm"]
    plan = [("ceiling", "ceiling", []), ("torch", "torch", []), ("torch-draft", "torch", ["--draft"]),
            ("keras-forward", "keras-forward", []), ("keras-forward-fold", "keras-forward", fold),
            ("ours-pillow", "ours", ["--decoder", "pillow"]), ("ours-nvjpeg", "ours", ["--decoder", "nvjpeg"]),
            ("ours-dali", "ours", ["--decoder", "dali"]), ("ours-dali-fold", "ours", ["--decoder", "dali", *fold]),
            ("ours-dali-ahead2", "ours", ["--decoder", "dali", "--in-flight", "2"])]
    only = set(filter(None, args.only.split(",")))
    facts = gpu_facts()
    rows, scans = [], None
    with tempfile.TemporaryDirectory(prefix="layertap-gpu-") as tmp:
        data = Path(tmp) / "images"
        n = tile(Path(args.data), args.images, data)
        print(f"{n} files under {data}", flush=True)
        if not only or "scan" in only:  # the stat cache on this host's cores (issue 13's 10x target)
            scans = compare(data, Path(tmp) / "scan-cache", rounds=2)
        steps = [("all", name, "decode", ["--decoder", name]) for name in DECODE_ONLY if not only or name in only]
        steps += [("all", f"dali@{load}", "decode", ["--decoder", "dali", "--hw-decoder-load", load])
                  for load in filter(None, args.dali_hw_loads.split(","))]
        steps += [(b, name, child, extra) for b in args.backbones.split(",") for name, child, extra in plan
                  if (not only or name in only) and (get_backbone(b).batchnorm or fold[0] not in extra)]
        for backbone, name, child, extra in steps:
            out = Path(tmp) / f"out-{backbone}-{name}"
            out.mkdir()
            command = ["-m", "bench.gpu", "child", child, "--backbone", backbone if backbone != "all" else "vgg16",
                       "--data", str(data), "--out", str(out), "--size", str(args.size),
                       "--batch-size", str(args.batch_size), *extra]
            try:
                result = run_child(command, env=env, timeout=600)
            except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the others
                result = {"error": str(exc)[-2000:]}
            row = {"backbone": backbone, "name": name, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
            partial = Path(args.results) / "gpu-partial.json"  # rows so far, should the run be cut off
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"machine": facts, "rows": rows, "scan": scans}, indent=2, default=str))
            shutil.rmtree(out, ignore_errors=True)
    markdown = table(rows, facts, args.size, args.batch_size) + (scans["table"] + "\n" if scans else "")
    print(markdown)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    payload = {"machine": facts, "images": n, "batch_size": args.batch_size, "size": args.size, "rows": rows,
               "scan": scans}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"gpu-{stamp}.json", "gpu-latest.json"):
        (results / name).write_text(json.dumps(payload, indent=2, default=str))
    (results / "gpu-latest.md").write_text(markdown)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2:])
    else:
        main()
