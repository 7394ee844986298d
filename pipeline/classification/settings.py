"""Stage two's settings: what it trains and where it writes (flags of ``layertap classify`` and ``sweep``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.settings import option

# The one default set, of the CLI and the Makefile alike: the linear probe, a linear SVM, cosine kNN and the
# tutorials' Dense head.
DEFAULT_CLASSIFIERS = ("logreg", "linsvm", "knn", "dense")


@dataclass(frozen=True)
class ClassifySettings:
    """What stage two trains and where it writes; validated when built. Each field's ``help`` says what it does.

    ``classifiers`` are specs: ``logreg``, ``linsvm``, ``knn``, ``dense`` or an import path, each
    optionally ``:{json params}`` (:func:`pipeline.heads.classifiers.make_classifier`).
    """

    store: str = option("", "the feature store", cli=False)
    classifiers: tuple[str, ...] = option(DEFAULT_CLASSIFIERS, "comma-separated: logreg, linsvm, knn, dense, probe, "
                                          "or an import path, each optionally with :{json params}", metavar="SPECS",
                                          group="stage two")
    layers: tuple[str, ...] = option((), "taps to train on (default: every tap of the store)", cli=False)
    out_dir: str = option("models", "folder of the runs", flag="--models", group="stage two")
    run: str | None = option(None, "run folder name (default: the store's name)", group="stage two")
    memory_budget: float = option(0.0, "GiB a tap's features may take in memory for the classifiers that need them "
                                       "whole (0: half the memory available); a larger tap trains only the "
                                       "streamed probe", metavar="GIB", group="stage two")
    seed: int = option(0, "seed of every random choice (splits, cross-validation folds, the Dense head)")
    test_fraction: float = option(0.25, "share of test images where the store records no split")
    val_fraction: float = option(0.15, "share of validation images where the store records no split")

    def __post_init__(self):
        if not self.store:
            raise ValueError("store is required: the feature store to train on")
        object.__setattr__(self, "classifiers", _names(self.classifiers) or DEFAULT_CLASSIFIERS)
        object.__setattr__(self, "layers", _names(self.layers))
        from pipeline.heads.classifiers import make_classifier  # scikit-learn: only when settings are made

        for spec in self.classifiers:
            make_classifier(spec)  # validates names and parameters now, not after an hour of training
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name}={getattr(self, name)!r} must be between 0 and 0.5")


def _names(value) -> tuple[str, ...]:
    """A tuple of names; one string is one name (comma lists are the command line's to split)."""
    return (value,) if isinstance(value, str) else tuple(value)
