"""layertap: transfer learning from the layers you choose.

The public API, for notebooks and scripts (the ``layertap`` command calls the same functions)::

    from pipeline import ExtractSettings, extract_features, ClassifySettings, classify, \\
        FinetuneSettings, finetune, predict, FeatureStore

    store = extract_features(ExtractSettings(data="photos/", weights="imagenet")).store_path
    run_dir, rows, models = classify(ClassifySettings(store=str(store), classifiers=("logreg",)))
    model_dir, metrics = finetune(FinetuneSettings(store=str(store)))
    predict(model_dir, ["new.jpg"])

The stages stand side by side on shared ground (README, "Layout"): :mod:`pipeline.extraction.extract`,
:mod:`pipeline.classification.classify`, :mod:`pipeline.finetuning.finetune` and :mod:`pipeline.prediction.predict` import
:mod:`pipeline.backbones.build`, :mod:`pipeline.store.feature_store`, :mod:`pipeline.store.manifest`, :mod:`pipeline.store.splits`,
:mod:`pipeline.runs.artifacts` and :mod:`pipeline.core.evaluation`, never each other. Names are imported on
first use, so ``import pipeline`` loads neither Keras nor scikit-learn.
"""

import importlib

from pipeline.core.errors import LayertapError
from pipeline.core.runtime import __version__, import_keras, set_backend_defaults


# name -> module of the public API, imported when first asked for.
_API = {
    "ExtractSettings": "pipeline.extraction.extract", "extract_features": "pipeline.extraction.extract",
    "ClassifySettings": "pipeline.classification.classify", "classify": "pipeline.classification.classify",
    "sweep": "pipeline.classification.classify",
    "FinetuneSettings": "pipeline.finetuning.finetune", "finetune": "pipeline.finetuning.finetune",
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
