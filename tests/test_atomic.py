"""Model folders replaced as a whole: killed writers, two writers and a reader (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from pipeline.runs.artifacts import _models_in, load_model

WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from pipeline.runs.artifacts import save_model

    target, mode, tags = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    X = np.random.default_rng(0).random((20, 3)); y = np.arange(20) % 2

    def save(tag):
        save_model(LogisticRegression().fit(X, y), target, {"tag": tag, "class_names": ["a", "b"]})

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "loop":
        for tag in tags:
            save(tag)
        sys.exit()
    save("old")
    try:
        import pipeline.runs.atomic as atomic
    except ImportError:  # the code before folders were swapped: its window was between two renames
        atomic = None
    if mode == "swap":  # killed at the swap itself: whatever moves a folder into place
        os.replace = os.rename = die
        if atomic:
            atomic._exchange = die
    else:  # "aside": no exchange on this system, killed after the old folder was moved aside
        if atomic:
            atomic._exchange = lambda a, b: False
        real, calls = os.rename, []
        def second_rename(a, b):
            calls.append(a)
            die() if len(calls) == 2 else real(a, b)
        os.rename = second_rename
    save("new")
""")


def _writer(target, mode, *tags):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(target), mode, *tags],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)


def _tag(model_dir) -> str:
    return load_model(model_dir)[1]["tag"]


@pytest.mark.parametrize("mode", ["swap", "aside"])
def test_a_writer_killed_while_replacing_a_model_folder_leaves_the_old_one(tmp_path, mode):
    target = tmp_path / "run" / "block4_pool-logreg"
    writer = _writer(target, mode)
    _, stderr = writer.communicate(timeout=120)
    assert writer.returncode == -signal.SIGKILL, stderr[-2000:]
    assert _tag(target) == "old"  # the old folder, whole (put back from aside where it was moved)
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")]
    assert leftovers and "block4_pool-logreg" in _models_in(target.parent)
    assert ".tmp-" not in _models_in(target.parent)  # a killed writer's folder is never offered as a model
    finished = _writer(target, "loop", "next")
    assert finished.wait(timeout=120) == 0
    assert _tag(target) == "next"
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == [target.name]  # dead leftovers swept


def test_two_writers_and_a_reader_never_see_a_missing_or_half_folder(tmp_path):
    target = tmp_path / "run" / "block4_pool-logreg"
    first = _writer(target, "loop", "seed")
    assert first.wait(timeout=120) == 0
    writers = [_writer(target, "loop", *[f"{name}{i}" for i in range(12)]) for name in ("a", "b")]
    seen, errors = set(), []
    while any(w.poll() is None for w in writers):
        try:
            seen.add(_tag(target))
        except Exception as exc:  # noqa: BLE001 - any failure to read is what this test looks for
            errors.append(repr(exc))
        time.sleep(0.005)
    assert [w.returncode for w in writers] == [0, 0], [w.stderr.read()[-2000:] for w in writers]
    assert not errors, errors[:3]
    assert len(seen) > 1 and _tag(target) in ("a11", "b11")
    assert json.loads((target / "manifest.json").read_text())["format"] == "skops"
    assert sorted(p.name for p in target.parent.iterdir() if p.is_dir()) == [target.name]
