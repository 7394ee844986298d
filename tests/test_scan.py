"""The stat cache: a cache-hit rerun reads no image bytes; a changed file is read and never silently reused."""

from __future__ import annotations

import os
import time

import pytest

import pipeline.data.scan as scan_module
import pipeline.extraction.engines.local as local_engine
from conftest import add_bad_files, make_split_folder, photo, tiny_settings
from pipeline import LayertapError
from pipeline.data.images import find_images
from pipeline.data.scan import LEGACY_FILE_NAME, RACY_NS, VERSION, Probe, StatCache, file_stat, scan_images
from pipeline.extraction.extract import extract_features

AN_HOUR_AGO = time.time() - 3600


def age(folder, seconds_ago: float = 3600) -> None:
    """Date every file back, as files are unless a tool just wrote them (fresh files are rehashed: RACY_NS)."""
    when = time.time() - seconds_ago
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


@pytest.fixture
def reads(monkeypatch) -> list:
    """Every file the scan reads, in this process (the scan's threads read; decoding has its own test)."""
    seen, read = [], scan_module.read_file
    monkeypatch.setattr(scan_module, "read_file", lambda path, **kw: seen.append(path) or read(path, **kw))
    return seen


def test_a_rerun_reads_no_image_bytes_and_an_edited_image_is_caught(tmp_path, reads, monkeypatch):
    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    age(data)
    first = extract_features(tiny_settings(data, tmp_path / "f"))
    assert len(reads) == 12 and StatCache(tmp_path / "f", data).path.is_file()

    reads.clear()
    decoding = local_engine.decoded_batches
    monkeypatch.setattr(local_engine, "decoded_batches", lambda *a, **k: pytest.fail("decoding started"))
    again = extract_features(tiny_settings(data, tmp_path / "f"))
    assert again.cache_hit and again.store_path == first.store_path and reads == []

    touched = data / "train" / "red" / "img_0.jpg"  # same bytes, new times: read again, still a cache hit
    os.utime(touched, (AN_HOUR_AGO + 60, AN_HOUR_AGO + 60))
    assert extract_features(tiny_settings(data, tmp_path / "f")).cache_hit and reads == [touched]

    reads.clear()
    monkeypatch.setattr(local_engine, "decoded_batches", decoding)
    edited = data / "test" / "blue" / "img_0.jpg"
    photo((0, 0, 0), seed=7).save(edited, "JPEG")  # new bytes, dated back like the others
    os.utime(edited, (AN_HOUR_AGO + 120, AN_HOUR_AGO + 120))
    changed = extract_features(tiny_settings(data, tmp_path / "f"))
    assert reads == [edited], "only the edited file is read"
    assert not changed.cache_hit and changed.store_path != first.store_path, "new bytes are a new store"


def test_verify_reads_every_file_and_unchanged_files_keep_their_store(tmp_path, reads):
    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    age(data)
    first = extract_features(tiny_settings(data, tmp_path / "f"))
    reads.clear()
    again = extract_features(tiny_settings(data, tmp_path / "f", verify=True))
    assert len(reads) == 12 and again.cache_hit and again.store_path == first.store_path


def test_files_that_are_gone_are_forgotten_and_new_ones_read_alone(tmp_path, reads):
    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    age(data)
    scan_images(find_images(data), cache=StatCache(tmp_path, data))
    (data / "train" / "red" / "img_0.jpg").unlink()
    reads.clear()
    scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert len(StatCache(tmp_path, data)) == 11 and reads == [], "the others are found by name, not position"
    added = data / "train" / "blue" / "a_new.bmp"  # listed first in its class: the files after it move down
    photo((1, 2, 3), seed=5).save(added)  # and a format that sorts before JPEG in the snapshot's table
    os.utime(added, (AN_HOUR_AGO, AN_HOUR_AGO))
    reads.clear()
    scanned = scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert reads == [added] and scanned == scan_images(find_images(data))
    reads.clear()
    assert scan_images(find_images(data), cache=StatCache(tmp_path, data)) == scanned and reads == []
    assert len(StatCache(tmp_path, data)) == 12


def test_a_rerun_over_an_unchanged_listing_writes_no_snapshot(tmp_path):
    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    age(data)
    scan_images(find_images(data), cache=StatCache(tmp_path, data))
    snapshot = StatCache(tmp_path, data).path
    written = os.stat(snapshot)
    scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert os.stat(snapshot).st_ino == written.st_ino and os.listdir(snapshot.parent) == [snapshot.name]


def test_a_snapshot_a_killed_run_left_half_written_is_removed_by_the_next_write(tmp_path):
    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    age(data)
    snapshot = StatCache(tmp_path, data).path
    snapshot.parent.mkdir()
    killed, writing = (snapshot.parent / f"{snapshot.name}.{name}.partial" for name in ("killed", "writing"))
    killed.write_bytes(b"PK half a snapshot")
    os.utime(killed, (AN_HOUR_AGO - 60, AN_HOUR_AGO - 60))
    writing.write_bytes(b"PK another run, writing now")
    scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert sorted(os.listdir(snapshot.parent)) == sorted([snapshot.name, writing.name])
    assert len(StatCache(tmp_path, data)) == 12


def test_new_bytes_under_the_old_size_and_modification_time_are_read_again(tmp_path, reads):
    """An edit in place that keeps the size and puts the modification time back (as `touch -r`, `rsync -t`
    or `cp -p` leave a file) still changes the file's change time: the file is read and hashed anew."""
    data = make_split_folder(tmp_path / "images", train=1, val=0, test=0)
    age(data)
    edited = data / "train" / "red" / "img_0.jpg"
    before = {r.path: r.fingerprint for r in scan_images(find_images(data), cache=StatCache(tmp_path, data)).records}
    time.sleep(0.05)  # the change time moves in clock ticks
    stat = os.stat(edited)
    with open(edited, "r+b") as fh:
        fh.seek(stat.st_size // 2)
        byte = fh.read(1)
        fh.seek(stat.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_stat(edited)[:2] == (stat.st_size, stat.st_mtime_ns)
    reads.clear()
    after = {r.path: r.fingerprint for r in scan_images(find_images(data), cache=StatCache(tmp_path, data)).records}
    assert reads == [edited] and after["train/red/img_0.jpg"] != before["train/red/img_0.jpg"]
    assert {k: v for k, v in after.items() if k != "train/red/img_0.jpg"} == {
        k: v for k, v in before.items() if k != "train/red/img_0.jpg"}


def test_a_file_modified_close_to_its_scan_is_read_again(tmp_path):
    """Git's racy-clean rule: a rewrite within one timestamp tick of the scan, same size, must not pass."""
    (tmp_path / "a.bin").write_bytes(b"x")
    stat, probe = file_stat(tmp_path / "a.bin"), Probe("0" * 32, "JPEG", 4, 4)
    cache = StatCache(tmp_path, tmp_path)
    with pytest.raises(RuntimeError, match="look the listing up first"):
        cache.save()
    assert cache.lookup(["a.bin"], [stat]) == [None]
    cache.remember("a.bin", stat, probe)
    cache.save()
    assert StatCache(tmp_path, tmp_path).lookup(["a.bin"], [stat]) == [None], "modified just before the entry was made"

    old = (stat[0], stat[1] - 2 * RACY_NS, *stat[2:])
    cache.remember("a.bin", old, probe)  # the same listing, one file remembered anew
    cache.save()
    assert StatCache(tmp_path, tmp_path).lookup(["a.bin"], [old]) == [probe]
    assert StatCache(tmp_path, tmp_path).lookup(["a.bin"], [(old[0] + 1, *old[1:])]) == [None], "another size"
    assert StatCache(tmp_path, tmp_path / "other").lookup(["a.bin"], [old]) == [None], "entries belong to their root"


def test_bad_files_are_remembered_with_their_reason_and_the_pixel_limit_applies_anew(tmp_path, reads):
    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    expected = add_bad_files(data / "train", "red")
    age(data)
    first = scan_images(find_images(data), cache=StatCache(tmp_path, data))
    reads.clear()
    again = scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert again == first and reads == []
    at_scan = {name for name, reason in expected.items() if reason != "cannot decode"}  # truncated: at decoding
    assert {s.path.rsplit("/", 1)[-1] for s in again.skipped} == at_scan
    touched = data / "val" / "red" / "img_0.jpg"  # one file read again: a new snapshot, the reasons in it too
    os.utime(touched, (AN_HOUR_AGO + 60, AN_HOUR_AGO + 60))
    assert scan_images(find_images(data), cache=StatCache(tmp_path, data)) == first and reads == [touched]
    reads.clear()
    assert scan_images(find_images(data), cache=StatCache(tmp_path, data)) == first and reads == []
    with pytest.raises(LayertapError, match="decompression bomb: 48x40"):  # the limit is applied to cached sizes
        scan_images(find_images(data), max_pixels=1000, cache=StatCache(tmp_path, data))
    assert reads == []


@pytest.mark.parametrize("damage", ["not a snapshot", "columns of different lengths"])
def test_a_damaged_cache_is_one_warning_and_the_same_results(tmp_path, reads, caplog, damage):
    import numpy as np

    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    age(data)
    cache = StatCache(tmp_path, data)
    if damage == "not a snapshot":
        cache.path.parent.mkdir()
        cache.path.write_bytes(b"this is not a snapshot" * 100)
    else:
        scan_images(find_images(data), cache=cache)
        with np.load(cache.path) as npz:
            columns = dict(npz)
        np.savez(cache.path, **{**columns, "fingerprints": columns["fingerprints"][:-1]})
        reads.clear()
    scanned = scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert scanned == scan_images(find_images(data)) and len(reads) == 24
    warnings = [r for r in caplog.records if "stat cache" in r.getMessage()]
    assert len(warnings) == 1 and "Delete the file" in warnings[0].getMessage()


def test_the_jpeg_facts_a_gpu_decoder_routes_by_come_back_from_the_cache(tmp_path, reads, caplog):
    from PIL import Image

    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo((9, 9, 9), size=(30, 20)).save(data / "train" / "red" / "img_0.jpg", exif=exif)
    photo((9, 9, 9)).save(data / "train" / "red" / "img_9.png")
    age(data)
    first = scan_images(find_images(data), cache=StatCache(tmp_path, data))
    facts = {r.path: r.jpeg for r in first.records}
    assert facts.pop("train/red/img_0.jpg") == (30, 20, 6) and facts.pop("train/red/img_9.png") is None
    assert set(facts.values()) == {(48, 40, 1)}
    reads.clear()
    again = scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert reads == [] and [r.jpeg for r in again.records] == [r.jpeg for r in first.records]

    import numpy as np

    cache = StatCache(tmp_path, data)  # a snapshot in an earlier layout is not read (not a damaged one either)
    with np.load(cache.path) as npz:
        columns = dict(npz)
    np.savez(cache.path, **{**columns, "version": np.array([VERSION - 1])})
    (tmp_path / LEGACY_FILE_NAME).write_bytes(b"the row-per-file cache of earlier versions")
    rescanned = scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert len(reads) == 13 and [r.jpeg for r in rescanned.records] == [r.jpeg for r in first.records]
    assert "stat cache" not in caplog.text and not (tmp_path / LEGACY_FILE_NAME).exists()


@pytest.mark.parametrize("slow", [False, True])
def test_stats_leave_the_calling_thread_only_where_the_filesystem_is_slow(tmp_path, monkeypatch, slow):
    """From the page cache threads only contend for the GIL; a slow filesystem's stats wait in parallel."""
    import threading

    paths = []
    for i in range(2 * scan_module.STAT_CHUNK + 5):
        paths.append(str(tmp_path / f"{i}.bin"))
        if i % 7:  # every seventh is missing: None in its place
            open(paths[-1], "wb").close()
    callers, stat = set(), scan_module.file_stat

    def observed(path):
        callers.add(threading.current_thread().name)
        if slow:
            time.sleep(2 * scan_module.SLOW_STAT_S)
        return stat(path)

    monkeypatch.setattr(scan_module, "file_stat", observed)
    stats = scan_module.stat_files(paths, workers=4)
    assert stats == [stat(path) for path in paths]
    assert [s is None for s in stats] == [i % 7 == 0 for i in range(len(paths))]
    here = threading.current_thread().name
    assert callers == ({here, "layertap_0", "layertap_1"} if slow else {here})


def test_the_listing_and_the_scan_pause_the_cycle_collector_and_restore_it(tmp_path, monkeypatch):
    """Listing and a cache hit make objects a file and no cycles: the collector's passes over the growing heap
    cost 1.3x at 131,072 files. Reading runs with it (threads' and Ray's objects). It is back on afterwards,
    also when the scan fails, and stays off where it was off."""
    import gc

    import pipeline.data.images as images_module

    data = make_split_folder(tmp_path / "images", train=1, val=0, test=0)
    age(data)
    seen = {"list": [], "stat": [], "read": []}
    listing, stat, read = images_module._from_folder, scan_module.file_stat, scan_module.read_file
    monkeypatch.setattr(images_module, "_from_folder",
                        lambda root: seen["list"].append(gc.isenabled()) or listing(root))
    monkeypatch.setattr(scan_module, "file_stat", lambda path: seen["stat"].append(gc.isenabled()) or stat(path))
    monkeypatch.setattr(scan_module, "read_file",
                        lambda path, **kw: seen["read"].append(gc.isenabled()) or read(path, **kw))
    scan_images(find_images(data), cache=StatCache(tmp_path, data))
    scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert seen == {"list": [False, False], "stat": [False] * 6, "read": [True] * 3} and gc.isenabled()
    for path in data.rglob("*.jpg"):
        path.write_bytes(b"")
    with pytest.raises(LayertapError, match="no usable images"):
        scan_images(find_images(data), cache=StatCache(tmp_path, data))
    assert gc.isenabled()
    gc.disable()
    try:
        find_images(data)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_two_listings_of_one_root_alternating_are_both_cache_hits(tmp_path, reads):
    """Two CSVs over one --root into one --out: each scan kept only its own listing, so the other's files were
    read and hashed again every time. Files of other listings are kept while unchanged on disk."""
    data = make_split_folder(tmp_path / "images", train=2, val=1, test=1)
    age(data)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
    listings = {}
    for name, part in (("a", files[:7]), ("b", files[5:])):  # overlapping
        listings[name] = tmp_path / f"{name}.csv"
        listings[name].write_text("path,label\n" + "".join(f"{f},{f.split('/')[1]}\n" for f in part))

    def scan(name):
        return scan_images(find_images(listings[name], root=data), cache=StatCache(tmp_path, data))

    first = {name: scan(name) for name in ("a", "b")}
    reads.clear()
    assert scan("a") == first["a"] and scan("b") == first["b"] and scan("a") == first["a"] and reads == []
    assert len(StatCache(tmp_path, data)) == len(files)
    (data / files[-1]).unlink()  # gone from the disk: forgotten at the next snapshot written
    scan("b")
    reads.clear()
    assert scan("a") == first["a"] and reads == [] and len(StatCache(tmp_path, data)) == len(files) - 1
