"""``make bench-probe-fit``: does the probe solve ``logreg``'s problem at each C? Train rows only.

The probe (:mod:`pipeline.heads.probe`) minimises scikit-learn's logistic-regression objective divided by the
rows, ``mean cross-entropy + ||W||^2 / (2 C n)`` on standardised features, with Adam in minibatches, every C at
once. scikit-learn's L-BFGS (``tol`` 1e-10) finds that objective's minimum; the gap between the two, C by C, is
how far the probe's schedule stops from the problem it claims to solve. Measured on the store's train rows
(the objective) and val rows (each C's accuracy, beside it), for the probe as it is and for each of
``--variants`` (its parameters changed, e.g. ``'{"batch_size": 1024}'``); the test rows are never read.

The probe trains here from memory (:meth:`~pipeline.heads.probe.StreamedProbe.every_c`): the same steps, batch
sizes and update as the streamed probe, the batches in another order. Default store: flowers17's
(hed-bsds500, as ``make bench-multitap``); ``--synthetic ROWS``: ``make bench-stage2``'s generator instead.
Writes ``bench/results/probe_fit-*.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.common import RESULTS, flowers17_store, publish
from pipeline.runs.reports import format_table


def objective(kernel, bias, X, y, C: float) -> float:
    """``mean cross-entropy + ||kernel||^2 / (2 C n)`` of a softmax regression on ``X`` (standardised), in
    float64: scikit-learn's objective divided by the rows."""
    from pipeline.core.evaluation import log_loss, softmax

    return log_loss(softmax(X @ kernel + bias), y) + float((kernel ** 2).sum()) / (2 * C * len(y))


def label(params: dict) -> str:
    """A variant's name in the table: its parameters, or "as is"."""
    return ", ".join(f"{k} {v}" for k, v in params.items()) or "as is"


def tap_rows(store, tap: str, variants: list[dict]) -> list[dict]:
    """For each C of the probe's grid: scikit-learn's objective at its minimum, and for each variant of the probe
    (its parameters) its gap above that minimum and its val accuracy."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads.probe import StreamedProbe, feature_scale

    train, val = store.splits.rows("train"), store.splits.rows("val")
    raw = store.features(tap, train).astype(np.float32)  # what the probe is given: it standardises them itself
    labels = store.labels
    y_train, y_val = labels[train], labels[val]
    mean, scale = raw.mean(axis=0, dtype=np.float64), feature_scale(raw.var(axis=0, dtype=np.float64))
    X_train = (raw - mean) / scale
    X_val = (store.features(tap, val) - mean) / scale
    probes = {}
    for params in variants:
        started = time.perf_counter()
        weights = StreamedProbe(**params).every_c(raw, y_train)
        # back to the standardised features the objective is stated on (every_c folds the scaling into the kernel)
        kernels = [k.astype(np.float64) for k, _ in weights]
        probes[label(params)] = ([(k * scale[:, None], b + mean @ k) for k, (_, b) in zip(kernels, weights)],
                                 time.perf_counter() - started)
    rows = []
    for i, C in enumerate(StreamedProbe().Cs):
        started = time.perf_counter()
        exact = LogisticRegression(C=C, tol=1e-10, max_iter=20_000).fit(X_train, y_train)
        row = {"tap": tap, "C": C, "sklearn_seconds": time.perf_counter() - started,
               "sklearn_objective": objective(exact.coef_.T, exact.intercept_, X_train, y_train, C),
               "sklearn_val": float((exact.predict(X_val) == y_val).mean())}
        for name, (weights, seconds) in probes.items():
            kernel, bias = weights[i]
            row[f"gap@{name}"] = objective(kernel, bias, X_train, y_train, C) - row["sklearn_objective"]
            row[f"val@{name}"] = float(((X_val @ kernel + bias).argmax(axis=1) == y_val).mean())
            row[f"probe_seconds@{name}"] = seconds
        rows.append(row)
        print(tap, {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return rows


def main() -> None:
    from bench.stage2 import synthetic_store
    from pipeline.store.feature_store import FeatureStore

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a feature store with a train/val/test split (default: flowers17's)")
    parser.add_argument("--layers", default="block3_pool,block4_pool,block5_pool", help="taps, comma-separated")
    parser.add_argument("--synthetic", type=int, metavar="ROWS",
                        help="a synthetic store of ROWS x 1,024 (make bench-stage2's), tap t, instead")
    parser.add_argument("--variants", nargs="*", default=[], metavar="JSON",
                        help="the probe with these parameters too, e.g. '{\"learning_rate\": 0.03}'")
    args = parser.parse_args()
    variants = [{}, *(json.loads(v) for v in args.variants)]
    if any("Cs" in v for v in variants):
        parser.error("a variant keeps the probe's grid of Cs: scikit-learn is fitted at each of those")
    names = [label(v) for v in variants]
    if args.synthetic:
        path = RESULTS / "work" / "probe_fit" / f"synthetic-{args.synthetic}.h5"
        store, taps = FeatureStore(path if path.exists() else synthetic_store(path, args.synthetic, 1024)), ["t"]
    else:
        store = FeatureStore(args.store) if args.store else flowers17_store(args.layers).store
        taps = args.layers.split(",")
    rows = [row for tap in taps for row in tap_rows(store, tap, variants)]
    table = format_table(
        ["tap", "C", "sklearn objective", *(f"gap, {n}" for n in names), "sklearn val", *(f"val, {n}" for n in names)],
        [[r["tap"], f"{r['C']:g}", f"{r['sklearn_objective']:.5f}", *(f"{r[f'gap@{n}']:.5f}" for n in names),
          f"{r['sklearn_val']:.3f}", *(f"{r[f'val@{n}']:.3f}" for n in names)] for r in rows],
        title=f"\nThe probe's objective above scikit-learn's minimum, train rows of {store.path.name} "
              f"(val accuracy beside it; test unread)")
    for name in names:
        gaps = np.array([r[f"gap@{name}"] for r in rows])
        seconds = sum({r["tap"]: r[f"probe_seconds@{name}"] for r in rows}.values())
        table += (f"\n{name}: largest gap {gaps.max():.5f}, mean {gaps.mean():.5f}; the probe's fits {seconds:.0f} s, "
                  f"scikit-learn's {sum(r['sklearn_seconds'] for r in rows):.0f} s")
    publish("probe_fit", {"store": str(store.path), "rows": rows, "variants": variants}, table)


if __name__ == "__main__":
    main()
