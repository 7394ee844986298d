"""Finding images by content, scanning out bad files, decoding every mode to RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import add_bad_files, make_class_folder, photo
from pipeline import LayertapError
from pipeline.data.decoding import decode_image, iter_decoded
from pipeline.data.headers import sniff_format
from pipeline.data.images import BadImageError, find_images
from pipeline.data.scan import scan_images


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_formats_are_recognised_by_content_not_extension(tmp_path, fmt):
    path = tmp_path / "no_extension_or_wrong.txt"
    photo((200, 40, 40)).save(path, fmt)
    assert sniff_format(path.read_bytes()[:16]) == fmt
    assert decode_image(path, 16).shape == (16, 16, 3)


def test_class_folder_layout(class_folder):
    images = find_images(class_folder)
    assert images.class_names == ("blue", "green", "red")
    assert len(images) == 12
    assert {r.split for r in images.records} == {""}
    assert [r.path for r in images.records] == sorted(r.path for r in images.records)


def test_split_folder_layout(split_folder):
    images = find_images(split_folder)
    splits = [r.split for r in images.records]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (9, 3, 6)
    assert images.class_names == ("blue", "green", "red")


def test_csv_layout_and_split_file(class_folder, tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text("path,label,split\nred/img_0.jpg,red,train\nblue/img_1.jpg,blue,test\n")
    images = find_images(class_folder, split_file=csv)
    assert [(r.path, r.label, r.split) for r in images.records] == [
        ("blue/img_1.jpg", "blue", "test"), ("red/img_0.jpg", "red", "train")]
    direct = find_images(csv, root=class_folder)
    assert direct.records == images.records
    with pytest.raises(LayertapError, match=r"2 files skipped, .*No listed file is in .*relative to --root"):
        scan_images(find_images(csv))  # relative to the CSV's folder, where the images are not
    (tmp_path / "red").mkdir()
    (tmp_path / "red" / "img_0.jpg").write_bytes(b"")
    with pytest.raises(LayertapError, match=r"img_1.jpg \(cannot read: No such file or directory\)$"):
        scan_images(find_images(csv))  # one listed file is there (if unusable): the hint would mislead


def test_csv_errors_name_the_file_and_line(class_folder, tmp_path):
    bad_header = tmp_path / "a.csv"
    bad_header.write_text("file,class\nx.jpg,red\n")
    with pytest.raises(LayertapError, match=r"a\.csv: header is file,class; it must be path,label"):
        find_images(bad_header)
    bad_split = tmp_path / "b.csv"
    bad_split.write_text("path,label,split\nred/img_0.jpg,red,training\n")
    with pytest.raises(LayertapError, match=r"b\.csv:2: split 'training' is not one of train, val, test"):
        find_images(bad_split, root=class_folder)


def test_bad_files_are_skipped_with_reasons(class_folder):
    expected = add_bad_files(class_folder)
    (class_folder / "stray.jpg").write_bytes(b"x")
    images = scan_images(find_images(class_folder))
    reasons = {s.path: s.reason for s in images.skipped}
    assert reasons["stray.jpg"] == "not in a class folder"
    for name in ("empty.jpg", "notes.jpg", "bomb.png"):
        assert expected[name] in reasons[f"red/{name}"]
    # A truncated JPEG has a valid header: the scan keeps it and decoding reports it.
    truncated = [r for r in images.records if r.path == "red/truncated.jpg"]
    assert truncated
    with pytest.raises(BadImageError, match="cannot decode"):
        decode_image(class_folder / "red/truncated.jpg", 32)


def test_a_file_that_is_no_image_decoded_directly_gives_the_scan_s_reason_not_pillow_s(tmp_path):
    """``predict``'s in-memory path decodes without a scan: a text file said "cannot decode:
    UnidentifiedImageError: cannot identify image file <_io.BufferedReader name=3>"."""
    (tmp_path / "notes.jpg").write_bytes(b"hello, world\n")
    (tmp_path / "header.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8)  # a PNG signature, nothing after
    with pytest.raises(BadImageError, match=r"^not an image \(first bytes b'hello, w'; JPEG, PNG"):
        decode_image(tmp_path / "notes.jpg", 32)
    with pytest.raises(BadImageError, match=r"^cannot decode: a PNG file whose header Pillow cannot read"):
        decode_image(tmp_path / "header.jpg", 32)


def test_pixel_limit_skips_large_images(class_folder):
    photo((200, 40, 40), size=(100, 100)).save(class_folder / "red" / "large.jpg")
    images = scan_images(find_images(class_folder), max_pixels=5000)  # the others are 48x40
    assert [s.path for s in images.skipped] == ["red/large.jpg"]
    assert "100x100 = 10,000 pixels is over the limit of 5,000" in images.skipped[0].reason
    assert len(images) == 12


def test_class_without_usable_images_is_left_out_and_named(class_folder):
    for path in (class_folder / "green").iterdir():
        path.write_bytes(b"")
    images = scan_images(find_images(class_folder))
    assert images.class_names == ("blue", "red")
    assert ("green/", "class left without images: none of its images could be used; the class is left out") in {
        (s.path, s.reason) for s in images.skipped}
    for path in (class_folder / "red").iterdir():
        path.write_bytes(b"")
    for path in (class_folder / "blue").iterdir():
        path.write_bytes(b"")
    with pytest.raises(LayertapError, match="no usable images in"):
        scan_images(find_images(class_folder))


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(LayertapError, match="has no class folders"):
        find_images(tmp_path / "nothing")


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)  # left half red, right half blue, as stored
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: stored left becomes displayed top
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "rotated.jpg", 32, draft=False).astype(int)
    assert out[:8, :, 0].mean() > 200 and out[:8, :, 2].mean() < 60
    assert out[-8:, :, 2].mean() > 200 and out[-8:, :, 0].mean() < 60


def test_modes_become_proper_rgb(tmp_path):
    Image.new("L", (16, 16), 128).save(tmp_path / "gray.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black
    rgba.save(tmp_path / "rgba.png")
    Image.new("RGB", (16, 16), (10, 200, 10)).convert("P").save(tmp_path / "palette.gif")
    wide = (np.arange(256 * 16, dtype=np.uint32).reshape(16, 256) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(wide).save(tmp_path / "deep.png")

    assert (decode_image(tmp_path / "gray.png", 8) == 128).all()
    cmyk = decode_image(tmp_path / "cmyk.jpg", 8).astype(int)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60
    assert (decode_image(tmp_path / "rgba.png", 8) == 255).all()  # transparency composited on white
    palette = decode_image(tmp_path / "palette.gif", 8).astype(int)
    assert palette[..., 1].mean() > 150 and palette[..., 0].mean() < 60
    deep = decode_image(tmp_path / "deep.png", 256, resize="squash")
    # 16-bit values are scaled to 8 bits, not clipped at 255: the gradient survives.
    assert deep[..., 0].min() < 5 and deep[..., 0].max() > 250 and np.median(deep[..., 0]) < 200
    # 32-bit integers in 0..255 stay as they are; floats in 0..1 are scaled by 255 (TIFFs from scientific tools)
    Image.fromarray(np.full((16, 16), 200, np.int32), "I").save(tmp_path / "int.tif")
    Image.fromarray(np.full((16, 16), 0.5, np.float32), "F").save(tmp_path / "unit.tif")
    assert (decode_image(tmp_path / "int.tif", 8) == 200).all()
    assert (decode_image(tmp_path / "unit.tif", 8) == 128).all()


@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_decode_size_and_draft(tmp_path, resize):
    photo((200, 40, 40), size=(400, 300)).save(tmp_path / "big.jpg", quality=90)
    full = decode_image(tmp_path / "big.jpg", 64, resize=resize, draft=False)
    drafted = decode_image(tmp_path / "big.jpg", 64, resize=resize, draft=True)
    assert full.shape == drafted.shape == (64, 64, 3)
    # Draft decoding at a reduced DCT scale stays close to the full decode.
    assert np.abs(full.astype(int) - drafted.astype(int)).mean() < 8


def test_iter_decoded_keeps_order_and_reports_failures(class_folder):
    add_bad_files(class_folder)
    paths = sorted((class_folder / "red").iterdir())
    results = list(iter_decoded(paths, lambda p: decode_image(p, 16), workers=3, prefetch=2))
    assert [i for i, _, _ in results] == list(range(len(paths)))
    failed = {paths[i].name for i, array, reason in results if array is None}
    assert failed == {"empty.jpg", "notes.jpg", "truncated.jpg", "bomb.png"}


def test_every_good_file_is_listed(tmp_path):
    root = make_class_folder(tmp_path / "d", per_class=2, fmt="PNG")
    assert len(scan_images(find_images(root)).records) == 6


def test_process_decoder_fills_batches_in_order_and_frees_its_memory(class_folder):
    from pipeline.data.decoding import ProcessDecoder

    expected = add_bad_files(class_folder)
    # over HUGE_PIXELS: decoded under the memory budget's semaphore
    Image.new("RGB", (4100, 4000), (200, 40, 40)).save(class_folder / "red" / "huge.png")
    paths = sorted(class_folder.rglob("*.*"))
    chunks = [(a, min(a + 5, len(paths))) for a in range(0, len(paths), 5)]
    decoder = ProcessDecoder(24, 5, workers=2, depth=2, resize="squash", draft=True)
    segment = Path("/dev/shm") / decoder._shm.name
    seen = []
    try:
        for (a, b), pixels, reasons in decoder.batches(paths, chunks):
            good = [p for p, r in zip(paths[a:b], reasons) if r is None]
            assert pixels.shape == (len(good), 24, 24, 3)
            for path, array in zip(good, pixels):
                np.testing.assert_array_equal(array, decode_image(path, 24))
            seen += [(p.name, r) for p, r in zip(paths[a:b], reasons) if r is not None]
    finally:
        decoder.close()
    assert {name for name, _ in seen} == set(expected)  # huge.png decoded
    for name, reason in seen:  # the decoder gives the scan's reasons (empty, not an image, too large)
        assert expected[name] in reason, (name, reason)
    assert not segment.exists()


def test_huge_decodes_are_budgeted_by_the_memory_available(monkeypatch):
    import pipeline.data.decoding as decoding

    monkeypatch.setattr(decoding, "available_memory", lambda: 2 * 10**9)  # 2 GB: one 89 MP decode at a time
    assert decoding.huge_decode_slots(89_478_485, workers=16) == 1
    monkeypatch.setattr(decoding, "available_memory", lambda: 10 * 10**9)  # half of it holds six
    assert decoding.huge_decode_slots(89_478_485, workers=16) == 6
    assert decoding.huge_decode_slots(89_478_485, workers=4) == 4
