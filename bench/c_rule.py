"""``make bench-c-rule``: which rule should choose the probe's C on val, measured without the test split.

The streamed probe trains every C of its grid at once and keeps one, chosen on the val rows. Three rules:
**A** best val accuracy, ties broken by the lower val cross-entropy; **B** the lowest val cross-entropy;
**C** (the probe's, :func:`pipeline.heads.probe.best_c`) the lowest val cross-entropy of the Cs whose val
accuracy is within one binomial standard error of the best. With 204 val images accuracy moves in steps of 0.5
points and ties are common; the cross-entropy is a proper score that moves with every image; with 40,000 val
rows accuracy resolves 0.2 points. Which rule picks Cs that generalise better is measured here on the
store's train and val rows only (the test rows are never read): ``--resplits`` seeded stratified splits of
them into inner train / inner val / inner holdout (60/20/20), one probe fit (all Cs) per tap and split, each
rule's C scored on the inner holdout. Writes ``bench/results/c_rule-*.json`` and prints the table.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from bench.common import flowers17_store, publish
from pipeline.runs.reports import format_table


def stratified_thirds(labels: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices into ``labels``: 60/20/20 of each class, shuffled by ``rng``."""
    parts = ([], [], [])
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        cut = np.round(np.array([0.6, 0.8]) * len(rows)).astype(int)
        for part, piece in zip(parts, np.split(rows, cut)):
            part.append(piece)
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def main() -> None:
    from pipeline.heads.probe import StreamedProbe, best_c, val_scores
    from pipeline.store.feature_store import FeatureStore

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a feature store with a train/val/test split (default: flowers17's, "
                                         "hed-bsds500, extracted or reused as make bench-multitap does)")
    parser.add_argument("--layers", default="block3_pool,block4_pool,block5_pool", help="taps, comma-separated")
    parser.add_argument("--resplits", type=int, default=10, help="seeded splits per tap (default: %(default)s)")
    parser.add_argument("--name", default="c_rule", help="the results' name in bench/results (default: %(default)s)")
    args = parser.parse_args()
    store = FeatureStore(args.store) if args.store else flowers17_store(args.layers).store
    kept = np.flatnonzero(store.splits != "test")
    labels = store.labels[kept]
    rules = {"A: accuracy, then loss": lambda s, n: max(range(len(s)), key=lambda k: (s[k][0], -s[k][1])),
             "B: loss": lambda s, n: min(range(len(s)), key=lambda k: s[k][1]),
             "C: loss within 1 s.e. of the best accuracy": best_c}  # the probe's rule
    fits, rows = [], []
    for tap in args.layers.split(","):
        X = store.features(tap, kept).astype(np.float32)
        for seed in range(args.resplits):
            train, val, holdout = stratified_thirds(labels, np.random.default_rng(seed))
            probe = StreamedProbe(random_state=seed)
            weights = probe.every_c(X[train], labels[train])
            on_val, _ = val_scores(weights, [(X[val], labels[val])])
            on_holdout, _ = val_scores(weights, [(X[holdout], labels[holdout])])
            fit = {"tap": tap, "seed": seed, "val": on_val, "holdout": on_holdout,
                   "chosen": {name: rule(on_val, len(val)) for name, rule in rules.items()}}
            fits.append(fit)
            print(tap, seed, {n: (probe.Cs[k], on_holdout[k][0]) for n, k in fit["chosen"].items()}, flush=True)
    Cs = StreamedProbe().Cs
    for name in rules:
        for tap in [*args.layers.split(","), "all"]:
            mine = [f for f in fits if tap in ("all", f["tap"])]
            accuracy = [f["holdout"][f["chosen"][name]][0] for f in mine]
            oracle = [max(a for a, _ in f["holdout"]) for f in mine]
            steps = [abs(f["chosen"][name] - max(range(len(Cs)), key=lambda k: f["holdout"][k][0])) for f in mine]
            rows.append([name, tap, f"{np.mean(accuracy):.4f}", f"{np.std(accuracy) / np.sqrt(len(mine)):.4f}",
                         f"{np.mean(oracle) - np.mean(accuracy):.4f}", f"{np.mean(steps):.2f}"])
    table = format_table(["rule", "tap", "holdout acc", "s.e.", "below the best C", "grid steps from it"], rows,
                         title=f"\nC chosen on inner val, scored on inner holdout ({args.resplits} splits a tap, "
                               f"test rows unread)")
    scored = {name: np.array([f["holdout"][f["chosen"][name]][0] for f in fits]) for name in rules}
    first, *others = rules
    paired = {}
    for name in others:
        d = scored[name] - scored[first]
        paired[name] = float(np.mean(d))
        table += (f"\n{name[0]} - {first[0]} over {len(fits)} fits: mean {np.mean(d):+.4f} (paired s.e. "
                  f"{np.std(d, ddof=1) / np.sqrt(len(fits)) if len(fits) > 1 else float('nan'):.4f}), "
                  f"{name[0]} better in {int((d > 0).sum())}, {first[0]} better in {int((d < 0).sum())}")
    for name in rules:
        picked = Counter(Cs[f["chosen"][name]] for f in fits)
        table += f"\nCs chosen by {name}: " + ", ".join(f"{c:g} x{n}" for c, n in sorted(picked.items()))
    publish(args.name, {"fits": fits, "Cs": list(Cs), "minus_first": paired}, table)


if __name__ == "__main__":
    main()
