"""Faults, each a real case: killed processes, bad inputs, damaged files, tampered models, a full disk.

Crash-safety guarantees that these tests pin are listed in docs/crash-safety.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, interruptible, leaked_segments, make_class_folder, processes_marked
from pipeline.store.feature_store import FeatureStore

TINY = ["--weights", "random", "--size", "32", "--layers", "block1_pool", "--batch-size", "4", "--workers", "2",
        "--shard-size", "4", "-q"]


def _script(tmp_path, body: str):
    """A script file: the decoding workers' forkserver imports it too, so a patch at its top reaches them."""
    path = tmp_path / "run_layertap.py"
    path.write_text(textwrap.dedent(body))
    return path


def _env(mark: str) -> dict:
    """The environment of a run: ``mark`` lets the test find every process the run started."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "LAYERTAP_TEST_MARK": mark}


def _run(script, *args, mark: str = "", timeout=120):
    return subprocess.run([sys.executable, str(script), *args], env=_env(mark), capture_output=True, text=True,
                          timeout=timeout)


def _gone(mark: str, within: float = 5.0) -> bool:
    deadline = time.time() + within
    while processes_marked(mark) and time.time() < deadline:
        time.sleep(0.1)
    return not processes_marked(mark)


KILLING_DECODER = """
    import os, signal, sys, time
    import pipeline.data.decoding as decoding

    real = decoding.decode_image

    def decode_or_die(path, *args, **kwargs):  # what the OOM killer does to a worker on a huge image
        if "killer" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        if "red/img_3" in str(path):  # the image before it, still decoding when it kills: an innocent bystander
            time.sleep(1.0)
        return real(path, *args, **kwargs)

    decoding.decode_image = decode_or_die

    if __name__ == "__main__":
        from pipeline.cli import main
        sys.exit(main(sys.argv[1:]))
"""


def test_an_image_that_kills_its_decoding_worker_is_skipped_and_named(tmp_path):
    data = make_class_folder(tmp_path / "data", per_class=4)
    (data / "red" / "killer.jpg").write_bytes((data / "red" / "img_0.jpg").read_bytes() + b"\0")
    script, mark = _script(tmp_path, KILLING_DECODER), f"layertap-faults-{os.getpid()}-{time.time()}"
    run = _run(script, "extract", "--data", str(data), "--out", str(tmp_path / "f"), *TINY, mark=mark)
    assert run.returncode == 0, run.stderr[-3000:]
    store = FeatureStore(next((tmp_path / "f").glob("*.h5")))
    assert len(store) == 12 and "red/killer.jpg" not in store.rows.paths
    assert dict(store.skipped)["red/killer.jpg"].startswith("the decoding process died on it")
    assert "skipped red/killer.jpg: the decoding process died on it" in run.stdout
    assert _gone(mark), "no decoding process may outlive the run"


SLOW_DECODER = """
    import time
    import pipeline.data.decoding as decoding

    real = decoding.decode_image

    def slow(path, *args, **kwargs):
        time.sleep(1.0)
        return real(path, *args, **kwargs)

    decoding.decode_image = slow

    if __name__ == "__main__":
        from pipeline.cli import entry  # what the layertap command runs
        entry()
"""


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_stops_the_run_within_a_second_and_leaves_nothing_behind(tmp_path, signum, code, word):
    """Ctrl-C, and SIGTERM (``kill``, a scheduler's stop) the same way: committed work kept, no process or
    shared memory left, and the command that resumes printed."""
    data = make_class_folder(tmp_path / "data", per_class=8)
    script, mark = _script(tmp_path, SLOW_DECODER), f"layertap-faults-{os.getpid()}-{time.time()}"
    process = subprocess.Popen([sys.executable, str(script), "extract", "--data", str(data), "--out",
                                str(tmp_path / "f"), *TINY], env=_env(mark), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 60
    while len(processes_marked(mark)) < 4 and time.time() < deadline:  # the run, a forkserver, two workers
        time.sleep(0.1)
    time.sleep(2.0)  # decoding is under way
    pids = {process.pid, *processes_marked(mark)}
    assert leaked_segments(pids), "the run's decoding segment is named after it (else the last check proves nothing)"
    started = time.time()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert time.time() - started < 1.0, "Ctrl-C must stop the run within a second"
    assert process.returncode == code and word in stderr, stderr[-2000:]
    assert f"the same command resumes from them: layertap extract --data {data} --out" in stderr
    assert _gone(mark), "no decoding process may outlive the run"
    assert not leaked_segments(pids)
    assert not list((tmp_path / "f").glob("*.h5"))


def _damage_first_chunk(store_path, tap: str) -> None:
    import h5py

    with h5py.File(store_path, "r") as fh:
        info = fh["features"][tap].id.get_chunk_info(0)
    with open(store_path, "r+b") as fh:  # random bytes inside the chunk, as a bad disk block would leave
        fh.seek(info.byte_offset + 16)
        fh.write(os.urandom(64))


def test_a_store_damaged_inside_its_features_is_refused_in_one_line_and_extracted_again(tmp_path, capsys, caplog):
    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data", per_class=8)
    args = ["extract", "--data", str(data), "--out", str(tmp_path / "f"), *TINY]
    assert main(args) == 0
    store_path = next((tmp_path / "f").glob("*.h5"))
    before = FeatureStore(store_path).features("block1_pool")
    _damage_first_chunk(store_path, "block1_pool")
    capsys.readouterr()
    assert main(["classify", "--store", str(store_path), "--models", str(tmp_path / "m"), "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert str(store_path) in error and "features of block1_pool are damaged" in error
    assert "run the same `layertap extract` again to replace it" in error
    with caplog.at_level("WARNING"):
        assert main(args) == 0  # not a cache hit: the damaged store is extracted again
    assert "extracting it again" in caplog.text and "cache hit" not in capsys.readouterr().out
    import numpy as np

    np.testing.assert_array_equal(FeatureStore(store_path).features("block1_pool"), before)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A stage-two model folder (logreg on a tiny store)."""
    from conftest import tiny_settings
    from pipeline.classification.classify import ClassifySettings, classify
    from pipeline.extraction.extract import extract_features

    root = tmp_path_factory.mktemp("models")
    data = make_class_folder(root / "data", per_class=8)
    store = extract_features(tiny_settings(data, root / "f", layers=("block1_pool",))).store_path
    result = classify(ClassifySettings(store=str(store), out_dir=str(root / "m")))
    return root, data, result.rows[0]["model_dir"]


PAYLOAD = "import pathlib; pathlib.Path({marker!r}).write_text('ran')"


class _RunsCode:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def _tamper(folder, tmp_path, list_hash: bool):
    """Make the folder load a pickle that runs code: format joblib, model.joblib, the hash listed or not."""
    import hashlib
    import json
    import pickle
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    marker = tmp_path / "code-ran"
    (tampered / "model.joblib").write_bytes(pickle.dumps(_RunsCode(PAYLOAD.format(marker=str(marker)))))
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["format"] = "joblib"
    if list_hash:
        manifest["files"] = {"model.joblib": hashlib.sha256((tampered / "model.joblib").read_bytes()).hexdigest()}
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    return tampered, marker


@pytest.mark.parametrize("list_hash", [False, True])
def test_predict_runs_no_code_from_a_model_folder(model_folder, tmp_path, capsys, list_hash):
    from pipeline.cli import main

    _, data, folder = model_folder
    tampered, marker = _tamper(folder, tmp_path, list_hash)
    assert main(["predict", str(tampered), str(data / "red" / "img_0.jpg")]) == 2
    error = capsys.readouterr().err
    assert not marker.exists(), "the folder's code ran"
    assert ("is a pickle" in error and "--trust" in error) if list_hash else "does not list model.joblib" in error
    if list_hash:  # the user's explicit choice, and only then
        from pipeline.runs.artifacts import load_model

        load_model(tampered, trust=True)
        assert marker.exists()


def test_an_untrusted_type_inside_a_skops_model_is_refused_and_named(model_folder, tmp_path):
    import hashlib
    import json
    import shutil

    import skops.io

    from pipeline import LayertapError
    from pipeline.runs.artifacts import load_model

    _, _, folder = model_folder
    tampered = tmp_path / "skops"
    shutil.copytree(folder, tampered)
    estimator, _ = load_model(folder)
    estimator.extra_ = _Unknown()
    (tampered / "model.skops").write_bytes(skops.io.dumps(estimator))
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["files"]["model.skops"] = hashlib.sha256((tampered / "model.skops").read_bytes()).hexdigest()
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LayertapError, match=r"holds types layertap does not trust to load: .*_Unknown.*--trust"):
        load_model(tampered)


class _Unknown:
    pass


def test_a_file_name_that_is_not_utf8_is_extracted_and_predicted(tmp_path):
    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data", per_class=8)
    odd = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes: no UTF-8 name exists for this file
    (data / "red" / odd).write_bytes((data / "red" / "img_0.jpg").read_bytes())
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "f"), *TINY]) == 0
    store = FeatureStore(next((tmp_path / "f").glob("*.h5")))
    assert f"red/{odd}" in store.rows.paths and len(store) == 25
    assert main(["classify", "--store", str(store.path), "--models", str(tmp_path / "m"), "-q"]) == 0
    model = next((tmp_path / "m").glob("*/block1_pool-logreg"))
    out = tmp_path / "p.csv"
    assert main(["predict", str(model), str(data / "red"), "--output", str(out)]) == 0
    lines = out.read_bytes().splitlines()
    assert len(lines) == 1 + 9 and any(b"caf\xe9-\xff.jpg" in line for line in lines)  # the file's own bytes
    printed = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(model), os.fsencode(data / "red" / odd)],
                             env=_env(""), capture_output=True, timeout=120)
    assert printed.returncode == 0 and b"caf\xe9-\xff.jpg: red" in printed.stdout, printed.stderr[-2000:]


def test_links_that_lead_nowhere_and_empty_class_folders_are_accounted_for(tmp_path):
    from pipeline.data.images import find_images

    data = make_class_folder(tmp_path / "data", per_class=2)
    (data / "red" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (data / "red" / "loop.jpg").symlink_to(data / "red" / "loop.jpg")
    (data / "empty").mkdir()
    skipped = {s.path: s.reason for s in find_images(data).skipped}
    assert skipped["red/gone.jpg"].startswith("broken symbolic link")
    assert skipped["red/loop.jpg"] == "symbolic link loop"
    assert skipped["empty/"] == "empty class folder: the class is left out"
    assert "empty" not in find_images(data).class_names


def test_a_class_whose_images_all_fail_to_decode_is_left_out_of_the_store_and_named(tmp_path):
    from conftest import tiny_settings
    from pipeline.extraction.extract import extract_features

    data = make_class_folder(tmp_path / "data", per_class=4)
    for path in (data / "green").iterdir():  # a valid header, so the scan keeps them; the decoder cannot
        path.write_bytes(path.read_bytes()[:400])
    store = FeatureStore(extract_features(tiny_settings(data, tmp_path / "f", layers=("block1_pool",))).store_path)
    assert store.class_names == ("blue", "red") and sorted(set(store.labels)) == [0, 1]
    assert dict(store.skipped)["green/"].startswith("class left without images")
    assert all(dict(store.skipped)[f"green/img_{i}.jpg"].startswith("cannot decode") for i in range(4))


@pytest.mark.parametrize("flag, value, message", [
    ("--weights", "README.md", "is not an HDF5 file; give a Keras .weights.h5"),
    ("--data", "JPEG", "is a JPEG image, not a CSV of path,label"),
])
def test_a_wrong_kind_of_file_is_named_in_one_line(tmp_path, capsys, flag, value, message):
    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data", per_class=2)
    value = str(ROOT / "README.md") if value == "README.md" else str(data / "red" / "img_0.jpg")
    args = {"--data": str(data), "--weights": "random", flag: value}
    assert main(["extract", "--data", args["--data"], "--weights", args["--weights"], "--out", str(tmp_path / "f"),
                 "-q"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


@pytest.fixture
def small_disk(tmp_path):
    """A 400 kB file system (tmpfs, where this machine lets the test mount one), unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); "
                    "test_a_full_disk_during_a_shard_write_is_one_line covers the write boundary")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_clean_line_and_keeps_committed_work(tmp_path, small_disk):
    data = make_class_folder(tmp_path / "data", per_class=8)
    out = small_disk / "features"
    args = [sys.executable, "-m", "pipeline", "extract", "--data", str(data), "--out", str(out), "--weights", "random",
            "--size", "32", "--layers", "block1_pool,block2_pool,block3_pool,block4_pool,block5_pool",
            "--shard-size", "2", "--batch-size", "2", "--workers", "2", "-q"]
    run = subprocess.run(args, env=_env(""), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, (run.returncode, run.stderr[-3000:])  # not a traceback, not a segfault
    assert len(run.stderr.strip().splitlines()) == 1 and "no space left on the disk" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "run the same command again" in run.stderr
    assert not list(out.glob("*.h5")) and list(out.glob("*.parts/*/shard-*.h5")), "committed shards are kept"
    assert not list(out.rglob(".*.tmp-*")), "no temporary file is left"


def test_a_full_disk_during_a_shard_write_is_one_line(tmp_path):
    """The write boundary alone, where no file system can be mounted: the disk fills on the third shard."""
    data = make_class_folder(tmp_path / "data", per_class=4)
    script = _script(tmp_path, """
        import errno, sys
        import pipeline.store.writing as store

        calls = []

        def full_after_two(path, mode="r", *args, **kwargs):
            if "w" in mode and ".shard-" in str(path):
                calls.append(path)
                if len(calls) > 2:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return open(path, mode, *args, **kwargs)

        store.open = full_after_two

        if __name__ == "__main__":
            from pipeline.cli import main
            sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "f"
    run = _run(script, "extract", "--data", str(data), "--out", str(out), *TINY)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr[-3000:]
    assert "no space left on the disk" in run.stderr
    assert len(list(out.glob("*.parts/*/shard-*.h5"))) == 2 and not list(out.rglob(".*.tmp-*"))


def test_a_full_disk_while_saving_a_model_is_one_line_and_leaves_no_half_folder(model_folder, tmp_path, capsys,
                                                                                 monkeypatch):
    import errno

    import pipeline.runs.artifacts as artifacts
    from pipeline.cli import main

    root, _, folder = model_folder
    store = next((root / "f").glob("*.h5"))

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(artifacts.Path, "write_bytes", full)  # the skops file's write
    models = tmp_path / "m"
    assert main(["classify", "--store", str(store), "--models", str(models), "-q"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no space left on the disk writing" in error and "model.skops" in error
    assert not list(models.rglob("*.tmp-*")), "no half-written model folder is left"


def test_a_named_pipe_in_a_class_folder_a_csv_or_predict_is_skipped_with_its_reason_never_read(model_folder,
                                                                                                tmp_path):
    """A FIFO with no writer blocks whoever opens it for good, and /dev/zero never ends: both are named and
    skipped, in a folder, in a CSV and given to predict (real processes, under a timeout)."""
    model = model_folder[2]
    data = make_class_folder(tmp_path / "data", per_class=4)
    os.mkfifo(data / "red" / "pipe.jpg")
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nred/img_0.jpg,red\nred/pipe.jpg,red\n/dev/zero,green\ngreen/img_0.jpg,green\n"
                   "blue/img_0.jpg,blue\n")
    for source in (["--data", str(data)], ["--data", str(csv), "--root", str(data), "--allow-outside-root"]):
        run = subprocess.run([sys.executable, "-m", "pipeline", "extract", *source, "--out", str(tmp_path / "f"),
                              *TINY], env=_env(""), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "red/pipe.jpg: not a regular file (a named pipe); only files are read" in run.stdout, run.stdout
    assert "/dev/zero: not a regular file (a character device)" in run.stdout
    printed = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(model), str(data / "red")],
                             env=_env(""), capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "pipe.jpg: ERROR not a regular file (a named pipe)" in printed.stdout, printed.stdout


def test_a_huge_file_is_refused_by_its_size_and_a_big_non_image_by_its_first_bytes(tmp_path):
    """Neither is read whole: a sparse 3 GB file is refused from its size, a 300 MB file that does not start
    like an image after its first 16 bytes (memory traced: the probe allocates kilobytes, not the file)."""
    import tracemalloc

    from pipeline.data.scan import probe_file

    huge = tmp_path / "disk.img"
    with open(huge, "wb") as fh:
        fh.truncate(3 << 30)
    big = tmp_path / "video.mkv"
    with open(big, "wb") as fh:
        fh.write(b"\x1aE\xdf\xa3 matroska")
        fh.truncate(300 << 20)
    tracemalloc.start()
    (huge_probe, _), (big_probe, _) = probe_file(huge), probe_file(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert huge_probe.reason == "3,221,225,472 bytes: over the 1,073,741,824-byte limit of one image file"
    assert big_probe.reason.startswith("not an image (first bytes b'\\x1aE\\xdf\\xa3 mat")
    assert peak < 1 << 20, f"{peak:,} bytes allocated"


def test_csv_paths_are_one_image_each_however_written_and_stay_under_the_root(tmp_path):
    """``./red/img_0.jpg`` and ``red//img_0.jpg`` are the same image (one label, one split, or an error); a path
    outside the root (absolute, or up through ``..``) is skipped unread, its bytes never in the skip list; a
    byte-order mark before the header (as Excel writes it) is no part of the first column's name."""
    from pipeline.core.errors import LayertapError
    from pipeline.data.images import find_images

    data = make_class_folder(tmp_path / "data", per_class=2)
    (tmp_path / "secret.txt").write_text("password=hunter2")
    twice = tmp_path / "twice.csv"
    twice.write_text("path,label,split\n./red/img_0.jpg,red,train\nred//img_0.jpg,red,test\n")
    with pytest.raises(LayertapError, match=r"twice.csv:3: red//img_0.jpg is listed twice \(as red/img_0.jpg\)"):
        find_images(twice, root=data)
    outside = tmp_path / "outside.csv"
    outside.write_bytes("\ufeffpath,label\nred/img_0.jpg,red\n../secret.txt,red\n/etc/hostname,blue\n"
                        "green/../blue/img_1.jpg,blue\n".encode())
    found = find_images(outside, root=data)
    assert [r.path for r in found.records] == ["blue/img_1.jpg", "red/img_0.jpg"]
    assert {s.path: s.reason.split(";")[0] for s in found.skipped} == {
        "../secret.txt": f"outside the root folder {data}", "/etc/hostname": f"outside the root folder {data}"}
    allowed = find_images(outside, root=data, allow_outside_root=True)
    assert "../secret.txt" in [r.path for r in allowed.records]


@pytest.mark.parametrize("damage, message", [
    (lambda m: [m], "a JSON list, not an object"),
    (lambda m: {**m, "files": list(m["files"])}, "'files' is not an object of file names to sha256 digests"),
    (lambda m: {**m, "class_names": m["class_names"][:2]}, "the model has 3 classes and the manifest names 2"),
    (lambda m: {**m, "class_names": ["red", "red", "blue"]}, "'class_names' names a class twice"),
])
def test_a_damaged_model_manifest_is_one_line_before_anything_in_it_is_used(model_folder, tmp_path, capsys,
                                                                             damage, message):
    import json
    import shutil

    from pipeline.cli import main

    _, data, folder = model_folder
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    (damaged / "manifest.json").write_text(json.dumps(damage(manifest)))
    assert main(["predict", str(damaged), str(data / "red" / "img_0.jpg")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "retrain the model" in error and len(error.splitlines()) == 1, error


def test_a_huge_wrong_model_file_is_refused_without_being_read_whole(model_folder, tmp_path):
    """The sha256 is computed in blocks before the file is read: a 3 GB stranger in the model's place costs
    a hash pass over it, not 3 GB of memory (memory traced)."""
    import shutil
    import tracemalloc

    from pipeline.core.errors import LayertapError
    from pipeline.runs.artifacts import load_model

    damaged = tmp_path / "damaged"
    shutil.copytree(model_folder[2], damaged)
    with open(damaged / "model.skops", "wb") as fh:
        fh.truncate(3 << 30)
    tracemalloc.start()
    with pytest.raises(LayertapError, match="model.skops does not match its manifest"):
        load_model(damaged)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, f"{peak:,} bytes allocated"


def test_predict_writes_cells_a_spreadsheet_shows_as_text(model_folder, tmp_path, monkeypatch):
    """File names (and labels, errors) that start like a formula (=, +, -, @) are prefixed with ' in predict's
    CSV, as OWASP recommends against CSV injection; the rest are written as they are."""
    import csv

    from pipeline.cli import main

    _, data, folder = model_folder
    monkeypatch.chdir(tmp_path)
    Path("=HYPERLINK(evil).jpg").write_bytes((data / "red" / "img_0.jpg").read_bytes())
    Path("@bad.jpg").write_text("not an image")
    Path("plain.jpg").write_bytes((data / "red" / "img_0.jpg").read_bytes())
    assert main(["predict", str(folder), "=HYPERLINK(evil).jpg", "@bad.jpg", "plain.jpg", "--output", "p.csv"]) == 0
    rows = list(csv.reader(open("p.csv", newline="")))
    assert [row[0] for row in rows[1:]] == ["'=HYPERLINK(evil).jpg", "'@bad.jpg", "plain.jpg"]  # in path order
    assert rows[2][1] and not any(rows[2][2:])  # the unreadable file: its error, no classes
    assert rows[1][2] == "red" and float(rows[1][3]) > 0


@pytest.mark.parametrize("flag, value, message", [
    ("--top-k", "0", "argument --top-k: 0 is not valid; it must be an integer >= 1"),
    ("--batch-size", "-4", "argument --batch-size: -4 is not valid; it must be an integer >= 1"),
    ("--top-k", "three", "argument --top-k: 'three' is not an integer"),
])
def test_predict_ranges_are_checked_by_the_flag(model_folder, capsys, flag, value, message):
    from pipeline.cli import main

    _, data, folder = model_folder
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(folder), str(data / "red" / "img_0.jpg"), flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_limits_known_up_front_are_checked_up_front(tmp_path, caplog):
    """--size whose decoding slots cannot fit in memory is refused when the settings are made (it died with
    ENOMEM allocating shared memory after the scan); --workers far beyond the cores is capped, with a warning."""
    from conftest import tiny_settings

    with pytest.raises(ValueError, match=r"image_size=20000 with batch_size=32 needs 214.6 GiB .* use a smaller "
                                         r"--size or --batch-size"):
        tiny_settings(tmp_path, tmp_path / "f", image_size=20000, batch_size=32)
    settings = tiny_settings(tmp_path, tmp_path / "f", workers=64 * (os.cpu_count() or 1))
    assert settings.workers == 2 * (os.cpu_count() or 1) and "decoding processes would only take turns" in caplog.text


@pytest.mark.parametrize("damage, message", [
    ("version", "has format_version 99; this layertap reads 1 to 1: upgrade layertap, or extract the store again"),
    ("rows", "24 labels but features/block1_pool 19 rows; the store is damaged"),
    ("labels", "its labels column is not what was written (its sha256 differs from the store's record"),
    ("shift", "its labels column is not what was written (its sha256 differs from the store's record"),
    ("paths", "its paths column is not what was written"),
    ("old-labels", "its labels run from 0 to 7 and it names 3 classes; the store is damaged"),
])
def test_a_store_whose_schema_is_broken_is_one_line_naming_it(tmp_path, capsys, damage, message):
    """A store from a newer layertap, one whose tap has fewer rows than its labels, whose per-image columns were
    changed after writing (labels shifted by five rows, paths rewritten: each column's sha256 is recorded), or
    (an older store, without those sums) whose labels point past its class names: refused on open (or when its
    columns are read), never an IndexError or a silent fit."""
    import h5py
    import numpy as np

    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data", per_class=8)
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "f"), *TINY]) == 0
    store = next((tmp_path / "f").glob("*.h5"))
    with h5py.File(store, "r+") as fh:
        if damage == "version":
            fh.attrs["format_version"] = 99
        elif damage == "rows":
            values = fh["features"]["block1_pool"][:19]
            del fh["features"]["block1_pool"]
            fh["features"].create_dataset("block1_pool", data=values).attrs["map_shape"] = [16, 16, 64]
        elif damage == "shift":
            fh["labels"][...] = np.roll(fh["labels"][()], 5)
        elif damage == "paths":
            fh["paths"][0] = b"somewhere/else.jpg"
        else:
            fh["labels"][:5] = np.arange(3, 8)
            if damage == "old-labels":
                del fh.attrs["columns_sha256"]
    capsys.readouterr()
    assert main(["classify", "--store", str(store), "--models", str(tmp_path / "m"), "-q"]) != 0
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error


def test_no_usable_image_after_decoding_or_a_single_class_is_an_error(tmp_path, capsys):
    """Images whose headers are fine but whose pixels do not decode left a store of 0 images (exit 0); a data
    set of one class trained nothing useful. Both are one line and exit 2, as every input the user can fix is
    (a full disk is 1), before a store is written."""
    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data", per_class=4)
    for path in data.rglob("*.jpg"):  # cut after the headers: the scan accepts them, decoding cannot
        path.write_bytes(path.read_bytes()[:400])
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "f"), *TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert "(after decoding): no class has usable images, and a classifier needs two classes or more" in error
    assert len(error.splitlines()) == 1 and not list((tmp_path / "f").glob("*.h5"))
    one = make_class_folder(tmp_path / "one", per_class=4)
    for extra in ("green", "blue"):
        for path in (one / extra).iterdir():
            path.unlink()
        (one / extra).rmdir()
    assert main(["extract", "--data", str(one), "--out", str(tmp_path / "f"), *TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert "only class 'red' has usable images, and a classifier needs two classes or more" in error, error


def test_a_store_with_shifted_labels_is_extracted_again_not_trained_on(tmp_path, caplog):
    import h5py
    import numpy as np

    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data", per_class=8)
    args = ["extract", "--data", str(data), "--out", str(tmp_path / "f"), *TINY]
    assert main(args) == 0
    store = next((tmp_path / "f").glob("*.h5"))
    labels = FeatureStore(store).labels
    with h5py.File(store, "r+") as fh:
        fh["labels"][...] = np.roll(fh["labels"][()], 5)
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert "its labels column is not what was written" in caplog.text and "extracting it again" in caplog.text
    np.testing.assert_array_equal(FeatureStore(store).labels, labels)


def test_a_path_that_is_not_what_it_should_be_is_one_line_naming_it(tmp_path, capsys):
    """--out or --models naming a file (a folder goes there): one line with the path, no traceback. --out is
    refused with the settings (exit 2), before the scan; a folder made later is the CLI's one line (exit 1)."""
    from pipeline.cli import main

    data = make_class_folder(tmp_path / "data", per_class=2)
    taken = tmp_path / "features"
    taken.write_text("a file")
    assert main(["extract", "--data", str(data), "--out", str(taken), *TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"layertap: error: {taken} is a file, where the folder of the feature stores goes (--out; " \
                    "predict's --features): give a folder", error
    assert main(["classify", "--data", str(make_class_folder(tmp_path / "more", per_class=8)), "--out",
                 str(tmp_path / "f"), "--models", str(taken / "runs"), "--classifiers", "logreg", *TINY]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"layertap: error: {taken} is a file, where `layertap classify` needs a folder (for "
                            f"{taken / 'runs'}"), error
    assert len(error.splitlines()) == 1
