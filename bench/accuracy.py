"""Accuracy on flowers17 with its split file, in one process: ``python -m bench.accuracy --work DIR``.

Extracts all five VGG16 taps at 224 px into ``<work>/features`` (a store already there is reused),
runs the linear-probe sweep and the four stage-two classifiers on the best tap, then stage three at
that tap with the default schedule but at most ``--fine-tune-epochs`` epochs of phase 2; with
``--deadline``, phase 2 trains for what is left until then (``fine_tune_minutes``; not at all when
that is under a minute), so that ``make bench`` fits its time on slow CPUs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import FLOWERS, SPLIT, emit
from pipeline import set_backend_defaults

TAPS = ("block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool")
CLASSIFIERS = ("logreg", "linsvm", "knn", "dense")
MIN_PHASE2_MINUTES = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", required=True, help="folder with features/ from the speed benchmark")
    parser.add_argument("--weights", default="hed-bsds500")
    parser.add_argument("--fine-tune-epochs", type=int, default=3)
    parser.add_argument("--deadline", type=float, help="Unix time by which phase 2's training should end")
    args = parser.parse_args()
    set_backend_defaults()  # before Keras loads TensorFlow, as the layertap command does

    from pipeline import (
        ClassifySettings,
        ExtractSettings,
        FinetuneSettings,
        classify,
        extract_features,
        finetune,
        sweep,
    )
    from pipeline.core.evaluation import best_on_val

    work = Path(args.work)
    common = dict(data=str(FLOWERS), split_file=str(SPLIT), weights=args.weights, out_dir=str(work / "features"),
                  progress=False)
    started = time.perf_counter()
    store = extract_features(ExtractSettings(layers=TAPS, image_size=224, **common)).store_path
    extract_s = time.perf_counter() - started
    _, sweep_rows = sweep(ClassifySettings(store=str(store), out_dir=str(work / "models")))
    best_tap = best_on_val(sweep_rows)["tap"]  # chosen on val, never on test
    classifier_rows = classify(ClassifySettings(store=str(store), classifiers=CLASSIFIERS, layers=(best_tap,),
                                                out_dir=str(work / "models"))).rows
    budget = None if args.deadline is None else (args.deadline - time.time()) / 60
    if budget is not None and budget < MIN_PHASE2_MINUTES:
        budget = 0.0  # skip phase 2: a few batches would say nothing, and its validation still costs a pass
    _, metrics = finetune(FinetuneSettings(store=str(store), layer=best_tap, fine_tune_epochs=args.fine_tune_epochs,
                                           fine_tune_minutes=budget, out_dir=str(work / "models"), progress=False))
    keep = ("accuracy", "val_accuracy", "phase1_accuracy", "precision", "probe", "stage_two", "gain",
            "gain_over_probe", "gain_over_phase1", "kept", "tap", "unfreeze_from", "fit_seconds", "n_train", "n_val",
            "n_test")
    phases = [{k: v for k, v in p.items() if k != "unfrozen_layers"} for p in metrics["phases"]]
    emit({"weights": args.weights, "extract_s": extract_s, "sweep": sweep_rows, "best_tap": best_tap,
          "classifiers_224": classifier_rows, "fine_tune_epochs": args.fine_tune_epochs,
          "fine_tune_budget_minutes": budget, "finetune_seconds": sum(p["seconds"] for p in phases),
          "precision": metrics["precision"], "finetune": {k: metrics[k] for k in keep} | {"phases": phases}})


if __name__ == "__main__":
    main()
