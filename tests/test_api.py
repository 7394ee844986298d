"""The public API: what `from pipeline import ...` gives, and docs/stages.md's "From Python" snippet, run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, make_split_folder


def test_public_names_are_the_stage_functions_and_settings():
    import pipeline.classification.classify
    import pipeline.finetuning.finetune
    import pipeline.prediction.predict

    assert pipeline.classify is pipeline.classification.classify.classify
    assert pipeline.finetune is pipeline.finetuning.finetune.finetune
    assert pipeline.predict is pipeline.prediction.predict.predict
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name


def readme_snippet() -> str:
    """The first ```python block of docs/stages.md's "From Python" section."""
    text = (ROOT / "docs" / "stages.md").read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_the_three_stages(tmp_path):
    data = make_split_folder(tmp_path / "photos", train=4, val=2, test=2)
    snippet = readme_snippet()
    settings_line = re.search(r"^DATA, WEIGHTS, SIZE = .*$", snippet, re.M)
    assert settings_line, "the snippet's first settings line is what this test replaces"
    # The snippet as written, on tiny data: random weights, 32 px images.
    script = snippet.replace(settings_line.group(0), f"DATA, WEIGHTS, SIZE = {str(data)!r}, 'random', 32")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gain" in run.stdout and "top" in run.stdout
    assert list((tmp_path / "features").glob("*.h5")) and list((tmp_path / "models").glob("*/*-finetune"))
