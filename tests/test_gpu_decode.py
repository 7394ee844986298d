"""The GPU decoders: JPEG header walk (always), and decoding through torchvision (nvjpeg) and NVIDIA DALI
(dali) where installed.

Where there is no CUDA GPU each decoder runs on the CPU device (libjpeg-turbo inside torchvision or
DALI): the same code path except for the device, so orientation, resizing, fallbacks, skips and the
order of a batch mixing GPU-decoded and Pillow-decoded images are checked. DALI hands its batch to the
Keras backend by DLPack on either device, so the JAX suite checks that hand-over too.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import add_bad_files, make_class_folder, photo, tiny_settings
from pipeline import LayertapError
from pipeline.core.runtime import keras_backend
from pipeline.data.decoding import CHANGED, decode_image
from pipeline.data.gpu_decode import check_decoder
from pipeline.data.headers import gpu_jpeg, jpeg_header


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **save)
    return buffer.getvalue()


def test_jpeg_header_reads_size_components_and_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    assert jpeg_header(jpeg_bytes(photo((200, 40, 40), size=(48, 40)))) == (48, 40, 3, 1)
    assert jpeg_header(jpeg_bytes(photo((200, 40, 40), size=(48, 40)), exif=exif)) == (48, 40, 3, 6)
    assert jpeg_header(jpeg_bytes(photo((9, 9, 9), size=(33, 17)).convert("L"), progressive=True)) == (33, 17, 1, 1)
    big_endian = jpeg_bytes(photo((1, 2, 3)), exif=exif).replace(b"Exif\x00\x00II*\x00", b"Exif\x00\x00MM\x00*")
    assert jpeg_header(big_endian) is not None  # garbled EXIF is ignored, never fatal


@pytest.mark.parametrize("data", [
    b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff\xe0\x00",
    jpeg_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0))),
])
def test_jpeg_header_sends_what_nvjpeg_cannot_take_to_pillow(data):
    assert jpeg_header(data) is None


def test_decoder_choice(monkeypatch):
    import pipeline.data.gpu_decode as gd

    monkeypatch.setattr(gd, "nvjpeg_available", lambda device=None: False)
    monkeypatch.setattr(gd, "dali_available", lambda device=None: False)
    assert check_decoder("pillow") == "pillow"
    with pytest.raises(LayertapError, match="--decoder pillow"):
        check_decoder("nvjpeg")
    with pytest.raises(LayertapError, match=r"layertap\[dali\].*--decoder pillow"):
        check_decoder("dali")
    with pytest.raises(ValueError, match="pillow, nvjpeg, dali"):
        check_decoder("turbo")


@pytest.mark.parametrize("backend, gpu, dali, engine, expected", [
    ("jax", True, True, "local", "dali"), ("torch", True, True, "local", "dali"),
    ("tensorflow", True, True, "local", "pillow"),  # DALI's batches would go through host memory
    ("jax", False, True, "local", "pillow"), ("jax", True, False, "local", "pillow"),
    ("jax", True, True, "ray", "pillow"),  # the GPUs are the cluster's, not this host's
])
def test_auto_decoder_is_dali_where_the_backend_has_a_gpu_and_dali_imports(monkeypatch, tmp_path, backend, gpu, dali,
                                                                           engine, expected):
    import pipeline.data.gpu_decode as gd
    from pipeline.extraction.engines import get_engine
    from pipeline.extraction.extract import ExtractSettings

    monkeypatch.setattr(gd, "keras_backend", lambda: backend)
    monkeypatch.setattr(gd, "on_gpu", lambda: gpu)
    monkeypatch.setattr(gd, "dali_available", lambda device=None: dali)
    here = get_engine(engine).decodes_here
    assert gd.resolve_decoder("auto", here) == expected
    for named in ("pillow", "nvjpeg", "dali"):
        assert gd.resolve_decoder(named, here) == named
    with pytest.raises(ValueError, match="auto, pillow, nvjpeg, dali"):
        gd.resolve_decoder("turbo")
    if engine == "local":  # the settings hold what auto resolved to: the cache key and manifest record it
        monkeypatch.setattr("pipeline.extraction.extract.check_decoder", lambda decoder, device=None: decoder)
        assert ExtractSettings(data=str(tmp_path), weights="random").decoder == expected


def test_auto_decoder_here(tmp_path):
    """Unpatched: pillow without a GPU (CI); dali on a GPU host with DALI and JAX or torch (the GPU sessions)."""
    import pipeline.data.gpu_decode as gd
    from pipeline.core.runtime import on_gpu
    from pipeline.extraction.extract import ExtractSettings

    decoder = ExtractSettings(data=str(tmp_path), weights="random").decoder
    if keras_backend() in ("jax", "torch") and on_gpu() and gd.dali_available():
        assert decoder == "dali"
    else:
        assert decoder == "pillow"
    assert ExtractSettings(data=str(tmp_path), weights="random", engine="ray").decoder == "pillow"


def test_a_gpu_dali_cannot_use_is_no_gpu_for_auto(monkeypatch):
    """A DALI whose CUDA driver query fails (a driver older than its CUDA) is not available: auto takes pillow."""
    backend = pytest.importorskip("nvidia.dali.backend")
    import pipeline.data.gpu_decode as gd

    def broken():
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(backend, "GetCUDADeviceCount", broken)
    monkeypatch.setattr(gd, "keras_backend", lambda: "jax")
    monkeypatch.setattr(gd, "on_gpu", lambda: True)
    assert not gd.dali_available("cuda") and gd.resolve_decoder("auto") == "pillow"
    with pytest.raises(LayertapError, match="--decoder pillow"):
        check_decoder("dali", "cuda")


@pytest.fixture(params=["nvjpeg", "dali"])
def gpu_decoder(request, monkeypatch):
    """A GPU decoder's factory, on the CPU device where there is no CUDA GPU."""
    import pipeline.data.gpu_decode as gd

    if request.param == "nvjpeg":
        pytest.importorskip("torchvision")
        import torch

        on_gpu, make = torch.cuda.is_available(), gd.NvjpegDecoder
    else:
        pytest.importorskip("nvidia.dali")
        from nvidia.dali import backend

        from pipeline.data.dali_decode import DaliDecoder

        on_gpu, make = backend.GetCUDADeviceCount() > 0, DaliDecoder
    if not on_gpu:
        monkeypatch.setattr(gd, "DEVICE", "cpu")
    return SimpleNamespace(name=request.param, make=make, on_gpu=on_gpu,
                           numpy=lambda batch: batch.cpu().numpy() if hasattr(batch, "cpu") else np.asarray(batch))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_and_resize_match_pillow(gpu_decoder, tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    path.write_bytes(jpeg_bytes(photo((200, 120, 40), size=(64, 40), seed=orientation), exif=exif))
    # Mean grey levels off Pillow at full resolution; a wrong orientation is off by tens. On the GPU (another
    # IDCT and chroma upsampling) squash was 1.4-1.5 on an H100, on the CPU under 1.
    differences = {}
    for resize, tolerance in (("squash", 2.0), ("crop", 8.0)):
        decoder = gpu_decoder.make(24, resize)
        batch, reasons = decoder([path])
        decoder.close()
        expected = decode_image(path, 24, resize, draft=False).astype(int)
        got = gpu_decoder.numpy(batch).astype(int)
        assert reasons == [None] and got.shape == (1, 24, 24, 3)
        differences[resize] = (np.abs(got[0] - expected).mean(), tolerance)
    assert all(difference < tolerance for difference, tolerance in differences.values()), differences


def test_other_formats_fall_back_to_pillow_and_bad_files_are_skipped(gpu_decoder, tmp_path):
    folder = make_class_folder(tmp_path / "d", per_class=2)
    expected = add_bad_files(folder)
    photo((1, 200, 3)).save(folder / "red" / "img.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "red" / "cmyk.jpg")
    # Half a JPEG with its end marker put back: a whole header and end, so it goes to the GPU decoder. On the
    # CPU device the decoders fill the missing rows with grey, as Pillow does; on a GPU, nvJPEG and DALI
    # return it black, unnoticed (measured on an H100). The images around it keep their places either way.
    good = (folder / "red" / "img_0.jpg").read_bytes()
    (folder / "red" / "patched.jpg").write_bytes(good[: len(good) // 2] + b"\xff\xd9")
    names = ["img_0.jpg", "img.png", "cmyk.jpg", "truncated.jpg", "patched.jpg", "img_1.jpg", "empty.jpg",
             "notes.jpg", "bomb.png"]
    decoder = gpu_decoder.make(16)
    batch, reasons = decoder([folder / "red" / name for name in names])
    decoder.close()
    if gpu_decoder.name == "dali":  # the Keras backend's own array, DALI's and Pillow's rows together
        assert type(batch).__module__.startswith({"jax": "jax", "torch": "torch"}.get(keras_backend(), "numpy"))
    pixels = gpu_decoder.numpy(batch).astype(int)
    decoded = ["img_0.jpg", "img.png", "cmyk.jpg", "patched.jpg", "img_1.jpg"]
    assert [name for name, reason in zip(names, reasons) if reason is None] == decoded
    assert pixels.shape == (5, 16, 16, 3)
    expected["truncated.jpg"] = "image file is truncated"  # Pillow's words: cut-off JPEGs go to it
    for name, reason in zip(names, reasons):
        assert name not in expected or expected[name] in reason, (name, reason)
    for row, name in enumerate(decoded):
        if name != "patched.jpg" or not gpu_decoder.on_gpu:
            assert np.abs(pixels[row] - decode_image(folder / "red" / name, 16).astype(int)).mean() < 4, name


def test_cut_off_jpegs_go_to_pillow_and_zero_padding_after_the_end_is_allowed(tmp_path):
    from pipeline.data.gpu_decode import read_and_route

    whole = jpeg_bytes(photo((200, 40, 40), size=(48, 40)))
    files = {"whole.jpg": whole, "padded.jpg": whole + bytes(40), "cut.jpg": whole[:-200],
             "trailing.jpg": whole + b"thumbnail data"}
    assert [gpu_jpeg(data) for data in files.values()] == [(48, 40, 1), (48, 40, 1), None, None]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    _, reasons, jpegs, host = read_and_route([tmp_path / name for name in files], None, 10**8)  # nvjpeg's routing
    assert reasons == [None] * 4 and [i for i, _ in jpegs] == [0, 1] and host == [2, 3]


def test_extraction_on_the_gpu_decoder_matches_pillow_and_has_its_own_cache_key(gpu_decoder, class_folder, tmp_path):
    from pipeline.extraction.extract import extract_features
    from pipeline.store.feature_store import FeatureStore

    add_bad_files(class_folder)
    nv = extract_features(tiny_settings(class_folder, tmp_path / "f", decoder=gpu_decoder.name, batch_size=5,
                                        shard_size=7))
    pil = extract_features(tiny_settings(class_folder, tmp_path / "f", decoder="pillow", draft=False))
    assert nv.store_path != pil.store_path
    a, b = FeatureStore(nv.store_path), FeatureStore(pil.store_path)
    assert a.manifest.decoder_name == gpu_decoder.name and b.manifest.decoder_name == "pillow"
    assert list(a.rows.paths) == list(b.rows.paths) and len(a) == 12
    assert sorted(p for p, _ in a.skipped) == sorted(p for p, _ in b.skipped)
    for tap in ("block1_pool", "block2_pool"):
        x, y = a.features(tap), b.features(tap)
        assert np.abs(x - y).max() <= 0.02 * np.abs(y).max()


def scanned(folder) -> tuple[list, list]:
    """The files of a class folder and their records, as the scan before an extraction gives them."""
    from pipeline.data.images import find_images
    from pipeline.data.scan import scan_images

    images = scan_images(find_images(folder))
    return [images.root / record.path for record in images.records], list(images.records)


def stream(decoder, paths, records, size: int):
    """``decoder.batches`` over chunks of ``size`` files, with the scan's stats and JPEG facts."""
    chunks = [(a, min(a + size, len(paths))) for a in range(0, len(paths), size)]
    return chunks, decoder.batches(paths, chunks, [r.stat for r in records], [r.jpeg for r in records])


@pytest.fixture
def dali(gpu_decoder):
    if gpu_decoder.name != "dali":
        pytest.skip("DALI's own reads and its queue of runs")
    return gpu_decoder


@pytest.mark.timeout(120, method="thread")  # a queue of DALI runs out of step would hang
def test_dali_reads_the_scanned_jpegs_itself_and_decodes_chunks_ahead(dali, tmp_path, monkeypatch):
    import builtins
    import os

    folder = make_class_folder(tmp_path / "d", per_class=8)
    photo((1, 200, 3)).save(folder / "green" / "img_9.png")  # Pillow's, in its place among DALI's
    paths, records = scanned(folder)
    png = [r.format for r in records].index("PNG")
    assert all(r.jpeg == (48, 40, 1) for r in records if r.format == "JPEG") and records[png].jpeg is None
    decoder = dali.make(16)
    chunks, batches = stream(decoder, paths, records, 5)
    alone = [dali.numpy(decoder(paths[a:b])[0]) for a, b in chunks]  # each file read here for its facts

    runs, schedule, opened, real_open = [], decoder._schedule, [], builtins.open
    decoder._schedule = lambda files, facts: runs.append(len(files)) or schedule(files, facts)
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(file) or real_open(file, *a, **k))
    real_os_open = os.open  # how image files are opened (pipeline.data.images.open_regular)
    monkeypatch.setattr(os, "open", lambda file, *a, **k: opened.append(file) or real_os_open(file, *a, **k))
    span, first, _ = next(batches)
    queued_at_first = len(runs)
    streamed = [(span, dali.numpy(first))] + [(span, dali.numpy(pixels)) for span, pixels, _ in batches]
    monkeypatch.undo()
    decoder.close()
    assert queued_at_first == 3, "the next two chunks were queued in DALI before the first was handed over"
    assert runs == [b - a - (a <= png < b) for a, b in chunks], "one DALI run a chunk: none fell back"
    assert [str(file) for file in opened] == [str(paths[png])], "Python opened only the PNG; DALI read the JPEGs"
    assert [s for s, _ in streamed] == chunks
    assert all(np.array_equal(a, b) for a, (_, b) in zip(alone, streamed))


@pytest.mark.timeout(120, method="thread")
def test_a_run_dali_fails_is_retried_one_image_at_a_time_and_the_queue_behind_it_kept(dali, tmp_path, caplog):
    folder = make_class_folder(tmp_path / "d", per_class=6)
    paths, records = scanned(folder)
    gone, edited = paths[5], paths[9]
    gone.unlink()  # after the scan: DALI's read of it fails its chunk's whole run
    photo((0, 0, 0), seed=9, size=(30, 30)).save(edited, "JPEG")  # new bytes: never stored under the old hash
    decoder = dali.make(16)
    first_pipeline = decoder._pipe
    with caplog.at_level("WARNING"):
        _, batches = stream(decoder, paths, records, 4)
        results = list(batches)
    assert decoder._pipe is not first_pipeline, "the retries run on a fresh pipeline (DALI calls the old one invalid)"
    with caplog.at_level("WARNING"):
        _, batches = stream(decoder, paths, records, 4)
        again = list(batches)
    decoder.close()
    reasons = [reason for _, _, chunk_reasons in results for reason in chunk_reasons]
    assert "No such file" in reasons[5] and reasons[9] == CHANGED
    assert [i for i, reason in enumerate(reasons) if reason] == [5, 9]
    pixels = np.concatenate([dali.numpy(p) for _, p, _ in results]).astype(int)
    kept = [path for i, path in enumerate(paths) if i not in (5, 9)]
    expected = np.stack([decode_image(path, 16, draft=False) for path in kept]).astype(int)
    assert pixels.shape == expected.shape and np.abs(pixels - expected).mean() < 4
    assert all(np.array_equal(dali.numpy(a[1]), dali.numpy(b[1])) and a[2] == b[2] for a, b in zip(results, again))
    assert caplog.text.count("decoding them one at a time") == 1 and str(gone) in caplog.text  # DALI's reason


def test_a_stream_left_early_leaves_the_decoder_ready(dali, tmp_path):
    paths, records = scanned(make_class_folder(tmp_path / "d", per_class=4))
    decoder = dali.make(16)
    _, batches = stream(decoder, paths, records, 2)
    next(batches)  # two more chunks queued in DALI
    with pytest.raises(RuntimeError, match="one stream of chunks at a time"):
        decoder(paths[:2])
    batches.close()
    pixels, reasons = decoder(paths[:3])
    decoder.close()
    expected = np.stack([decode_image(path, 16, draft=False) for path in paths[:3]]).astype(int)
    assert reasons == [None] * 3 and np.abs(dali.numpy(pixels).astype(int) - expected).mean() < 4


def test_a_dali_that_cannot_start_says_so_and_how_to_decode_on_the_cpu(dali, class_folder, tmp_path, monkeypatch):
    from pipeline.data.dali_decode import DaliDecoder
    from pipeline.extraction.extract import extract_features

    def fails(self):
        raise RuntimeError("nvImageCodec: no decoder for the mixed backend\n[/opt/dali/pipeline.cc:123] stack ...")

    monkeypatch.setattr(DaliDecoder, "_build", fails)
    with pytest.raises(LayertapError, match=r"DALI could not start a decoder \(RuntimeError: nvImageCodec: no decoder "
                                            r"for the mixed backend\); use --decoder pillow") as error:
        extract_features(tiny_settings(class_folder, tmp_path / "f", decoder="dali"))
    assert "stack" not in str(error.value)


def test_fine_tuning_a_gpu_decoded_store_allows_for_the_decoders_difference(dali, tmp_path, monkeypatch):
    """Fine-tuning decodes with Pillow; a store DALI made differs from that by about a grey level on a GPU (one
    grey level added here stands in for it), which the composition check allows only for such a store."""
    import pipeline.finetuning.finetune as finetuning
    from conftest import make_split_folder
    from pipeline.extraction.extract import extract_features
    from pipeline.finetuning.finetune import FinetuneSettings, finetune

    decode = finetuning.decode_store_rows
    monkeypatch.setattr(finetuning, "decode_store_rows",
                        lambda *args: np.clip(decode(*args).astype(int) + 1, 0, 255).astype(np.uint8))
    data = make_split_folder(tmp_path / "data", train=4, val=2, test=2)
    quick = dict(layer="block2_pool", epochs=1, fine_tune_epochs=0, batch_size=8, hidden_units=8, workers=2,
                 progress=False)
    for decoder in ("dali", "pillow"):
        store = extract_features(tiny_settings(data, tmp_path / "f", decoder=decoder, precision="float32")).store_path
        settings = FinetuneSettings(store=str(store), out_dir=str(tmp_path / decoder), **quick)
        if decoder == "dali":
            _, metrics = finetune(settings)
            assert 1e-3 < metrics["composition_error"] <= 2e-2
        else:  # decoded as at extraction: the check stays exact and catches the grey level
            with pytest.raises(LayertapError, match="does not reproduce the store's features"):
                finetune(settings)
