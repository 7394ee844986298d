"""The nvjpeg decoder: JPEG header walk (always), and decoding through torchvision where installed.

Where there is no CUDA GPU the decoder runs on the CPU device (torchvision's libjpeg-turbo): the
same code path except for the stream, so orientation, resizing, fallbacks and skips are checked.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import add_bad_files, make_class_folder, photo, tiny_settings
from PIL import Image

from pipeline import LayertapError
from pipeline.gpu_decode import check_decoder
from pipeline.decoding import decode_image
from pipeline.images import jpeg_header


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
    import pipeline.gpu_decode as gd

    monkeypatch.setattr(gd, "nvjpeg_available", lambda: False)
    assert check_decoder("pillow") == "pillow"
    with pytest.raises(LayertapError, match="--decoder pillow"):
        check_decoder("nvjpeg")
    with pytest.raises(ValueError, match="pillow, nvjpeg"):
        check_decoder("turbo")


@pytest.fixture
def cpu_decoder(monkeypatch):
    pytest.importorskip("torchvision")
    import torch

    import pipeline.gpu_decode as gd

    if not torch.cuda.is_available():
        monkeypatch.setattr(gd, "DEVICE", "cpu")
    monkeypatch.setattr(gd, "nvjpeg_available", lambda: True)
    return gd


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_and_resize_match_pillow(cpu_decoder, tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    path.write_bytes(jpeg_bytes(photo((200, 120, 40), size=(64, 40), seed=orientation), exif=exif))
    for resize, tolerance in (("squash", 1.0), ("crop", 8.0)):
        decoder = cpu_decoder.NvjpegDecoder(24, resize)
        batch, reasons = decoder([path])
        decoder.close()
        expected = decode_image(path, 24, resize, draft=False).astype(int)
        got = batch.cpu().numpy().astype(int)
        assert reasons == [None] and got.shape == (1, 24, 24, 3)
        assert np.abs(got[0] - expected).mean() < tolerance, (resize, orientation)


def test_other_formats_fall_back_to_pillow_and_bad_files_are_skipped(cpu_decoder, tmp_path):
    folder = make_class_folder(tmp_path / "d", per_class=1)
    expected = add_bad_files(folder)
    photo((1, 200, 3)).save(folder / "red" / "img.png")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "red" / "cmyk.jpg")
    names = ["img_0.jpg", "img.png", "cmyk.jpg", *expected]
    decoder = cpu_decoder.NvjpegDecoder(16)
    batch, reasons = decoder([folder / "red" / name for name in names])
    decoder.close()
    assert reasons[:3] == [None, None, None] and batch.shape == (3, 16, 16, 3)
    expected["notes.jpg"] = "cannot decode"  # the scan before an extraction says "not an image"
    for name, reason in zip(names[3:], reasons[3:]):
        assert expected[name] in reason
    cmyk = decode_image(folder / "red" / "cmyk.jpg", 16).astype(int)
    assert np.abs(batch[2].cpu().numpy().astype(int) - cmyk).max() <= 2


def test_extraction_with_nvjpeg_matches_pillow_and_has_its_own_cache_key(cpu_decoder, class_folder, tmp_path):
    from pipeline.extract import extract_features
    from pipeline.store import FeatureStore

    add_bad_files(class_folder)
    nv = extract_features(tiny_settings(class_folder, tmp_path / "f", decoder="nvjpeg", batch_size=5, shard_size=7))
    pil = extract_features(tiny_settings(class_folder, tmp_path / "f", decoder="pillow", draft=False))
    assert nv.store_path != pil.store_path
    a, b = FeatureStore(nv.store_path), FeatureStore(pil.store_path)
    assert a.manifest.decoder_name == "nvjpeg" and b.manifest.decoder_name == "pillow"
    assert list(a.rows.paths) == list(b.rows.paths) and len(a) == 12
    assert sorted(p for p, _ in a.skipped) == sorted(p for p, _ in b.skipped)
    for tap in ("block1_pool", "block2_pool"):
        x, y = a.features(tap), b.features(tap)
        assert np.abs(x - y).max() <= 0.02 * np.abs(y).max()
