"""layertap: transfer learning from the layers you choose.

The public API, for notebooks and scripts (the ``layertap`` command calls the same functions)::

    from pipeline import ExtractSettings, extract_features, ClassifySettings, classify, sweep, \\
        FinetuneSettings, finetune, predict, FeatureStore

    store = extract_features(ExtractSettings(data="photos/", weights="imagenet")).store_path
    run_dir, rows = sweep(ClassifySettings(store=str(store)))  # which layer? one linear probe per tap
    result = classify(ClassifySettings(store=str(store), classifiers=("logreg",)))
    print(result.best, result.summary.recommended["model_dir"])
    model_dir, metrics = finetune(FinetuneSettings(store=str(store)))
    predict(model_dir, ["new.jpg"])

One subpackage per concern (docs/architecture.md): the stages ``extraction``, ``classification``,
``finetuning`` and ``prediction`` stand side by side on shared ground (``core``, ``backbones``, ``data``,
``store``, ``heads``, ``runs``) and never import each other; ``tests/test_layout.py`` holds the rule.
Names are imported on first use, so ``import pipeline`` loads neither Keras nor scikit-learn.
"""

import importlib

from pipeline.core.errors import LayertapError
from pipeline.core.runtime import __version__ as __version__
from pipeline.core.runtime import import_keras, set_backend_defaults

# name -> module of the public API, imported when first asked for.
_API = {
    "ExtractSettings": "pipeline.extraction.extract", "extract_features": "pipeline.extraction.extract",
    "ClassifySettings": "pipeline.classification.settings", "classify": "pipeline.classification.classify",
    "sweep": "pipeline.classification.classify",
    "FinetuneSettings": "pipeline.finetuning.settings", "finetune": "pipeline.finetuning.finetune",
    "predict": "pipeline.prediction.predict",
    "FeatureStore": "pipeline.store.feature_store", "StoreManifest": "pipeline.store.manifest",
    "load_model": "pipeline.runs.artifacts",
}
__all__ = ["LayertapError", "set_backend_defaults", "import_keras", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
