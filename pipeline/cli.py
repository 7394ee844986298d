"""The ``layertap`` command line: parses flags, calls the stage functions, prints summaries."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys
import textwrap
from pathlib import Path

from pipeline.backbones.build import layer_rows
from pipeline.backbones.pooling import dense_params, pooled_dims
from pipeline.backbones.registry import BACKBONES, get_backbone
from pipeline.classification.settings import ClassifySettings
from pipeline.core.errors import LayertapError
from pipeline.core.runtime import __version__, set_backend_defaults, stop_on_sigterm
from pipeline.core.settings import add_settings_options, settings_from_args
from pipeline.data.datasets import fetch_flowers17
from pipeline.data.sample import ensure_sample
from pipeline.extraction.engines import ENGINES, get_engine
from pipeline.extraction.extract import ExtractSettings, extract_features
from pipeline.finetuning.settings import FinetuneSettings
from pipeline.prediction.predict import predict, write_csv
from pipeline.runs.reports import (
    comparison_table,
    extract_summary,
    format_table,
    gain_text,
    stage_table,
    store_summary,
    sweep_table,
)
from pipeline.store.feature_store import FeatureStore
from pipeline.store.writing import DiskFullError

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

Splits: the store's recorded split (folders or CSV; without val rows, a seeded stratified share
of train becomes val); where there is none, a seeded stratified train/val/test split (stage three
uses the same). Classifiers fit on the train rows (logreg and linsvm pick C by stratified
cross-validation there; the Dense head stops early on val). The best is chosen on val accuracy;
test accuracy is scored once, for the report."""


FINETUNE_EXAMPLES = """\
examples:
  layertap finetune --store features/<store>.h5      # after classify: its best tap on val, LP-FT defaults
  layertap finetune --data ../shared/data/flowers17 --split-file ../shared/data/flowers17-split.csv \\
                    --weights hed-bsds500 --layers block4_pool --unfreeze-from block4_conv3
  layertap finetune --store S.h5 --layer block5_pool --fine-tune-epochs 5 --fine-tune-lr 3e-5 --augment flip
  layertap finetune --store S.h5 --head dense --phase1 images   # the tutorials' recipe: a Dense head first

Phase 1 is stage two's linear probe on the tap (same code, same train rows), folded exactly into
the network's softmax layer; phase 2 unfreezes from --unfreeze-from and trains on augmented images.
Every choice (tap, epoch, phase) is made on val; test is scored once, against stage two's probe and
its best model on val. --train-batch-size is the training batch, --batch-size the extraction's.
BatchNorm layers stay frozen. Everything is seeded (--seed). The model folder's model.keras takes
pixels and returns probabilities: `layertap predict` runs it."""


def _extract_settings(args):
    options = settings_from_args(get_engine(args.engine).Options, args)
    return settings_from_args(ExtractSettings, args, engine_options=options)


def cmd_extract(args) -> int:
    settings = _extract_settings(args)
    result = extract_features(settings)
    print(extract_summary(result, settings))
    return 0


def _store_for(args) -> str:
    """The store a stage-two command works on: --store, else the extraction its flags describe."""
    if args.store:
        return args.store

    settings = _extract_settings(args)
    result = extract_features(settings)
    if not result.cache_hit:
        print(extract_summary(result, settings))
    return str(result.store_path)


def cmd_classify(args) -> int:
    from pipeline.classification.classify import classify

    settings = settings_from_args(ClassifySettings, args, store=_store_for(args), layers=args.layers)
    report = None if not args.progress else (lambda r: print(
        f"  {r['tap']:<18} {r['classifier']:<12} val acc {r['val_accuracy']:.3f}  ({r['fit_seconds']:.1f} s)"))
    result = classify(settings, progress=report)
    best = result.best
    print(f"\n{comparison_table(result.rows)}\n\nbest on val: {best['tap']} + {best['classifier']} (val "
          f"{best['val_accuracy']:.3f}; its test accuracy {best['accuracy']:.3f}); models and reports in "
          f"{result.run_dir}/")
    return 0


def cmd_sweep(args) -> int:
    from pipeline.classification.classify import sweep

    report = None if not args.progress else (lambda r: print(f"  {r['tap']:<18} val acc {r['val_accuracy']:.3f}"))
    run_dir, rows = sweep(_store_for(args), out_dir=args.models, run=args.run, seed=args.seed, progress=report)
    print(f"\n{sweep_table(rows)}\n\nplot: {run_dir / 'sweep.png'}; table: {run_dir / 'sweep.md'}")
    return 0


def cmd_finetune(args) -> int:
    from pipeline.finetuning.finetune import finetune

    model_dir, metrics = finetune(settings_from_args(FinetuneSettings, args, store=_store_for(args)))
    print(f"\nstage two vs stage three on the same {metrics['n_test']} test images "
          f"({metrics['tap']}):\n{stage_table(metrics)}\n\ngain over stage two's best on val: "
          f"{gain_text(metrics['gain'])}\ngain over stage two's probe on {metrics['tap']}: "
          f"{gain_text(metrics['gain_over_probe'])}\n"
          f"model, report and learning curves in {model_dir}/ (layertap predict {model_dir} IMAGES)")
    return 0


def cmd_predict(args) -> int:
    import json


    results = predict(args.model, args.images, top_k=args.top_k, batch_size=args.batch_size, trust=args.trust)
    bad = [r for r in results if "error" in r]
    if args.output:
        out = Path(args.output)
        if out.suffix == ".json":
            out.write_text(json.dumps(results, indent=2))
        else:
            write_csv(results, out, args.top_k)
        print(f"{len(results) - len(bad)} images classified, {len(bad)} not readable; written to {out}")
    else:
        for r in results:
            top = "  ".join(f"{c} {p:.3f}" for c, p in r.get("top", []))
            print(f"{r['path']}: {top or 'ERROR ' + r['error']}")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the flag in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid; it must be an integer >= 1")
    return value


def cmd_layers(args) -> int:
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
    print(store_summary(FeatureStore(args.store)))
    return 0


def cmd_sample(args) -> int:
    print(ensure_sample(args.dest))
    return 0


def cmd_fetch(args) -> int:
    dest = fetch_flowers17(args.dest, args.archive, progress=not args.quiet)
    print(f"flowers17: {sum(1 for _ in dest.glob('*/*.jpg')):,} images in {dest}")
    return 0


COMMANDS = ("extract", "classify", "sweep", "finetune", "predict", "layers", "inspect", "sample", "fetch")


def build_parser(commands=COMMANDS) -> argparse.ArgumentParser:
    """The ``layertap`` parser; the options of only the named ``commands`` are built (they import their stage)."""
    parser = argparse.ArgumentParser(
        prog="layertap", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Transfer learning from the layers you choose: extract pooled activations of a frozen "
                    "CNN into cached HDF5 feature stores, then train classifiers on them in seconds.",
        epilog="Start with `layertap layers vgg16`, then `layertap extract --help`.")
    parser.add_argument("--version", action="version", version=f"layertap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the Keras backend's own start-up messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str, options=None, **text) -> None:
        p = sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter, **text)
        p.set_defaults(func=func)
        if options and name in commands:  # another command's options are not built: no stage imports another
            options(p)

    def extraction(*stage_settings):
        """The extraction flags; for a stage on a store, --store first and the stage's own flags."""
        def add(p):
            added = set()
            if stage_settings:
                p.add_argument_group("stage two").add_argument(
                    "--store", help="a feature store; without it, the store the extraction flags below describe "
                                    "is used (extracted first if missing: a cache hit decodes nothing)")
                added = add_settings_options(p, *stage_settings)
            add_settings_options(p, ExtractSettings, *(e.Options for e in ENGINES.values()), added=added)
        return add

    def arguments(*specs):
        def add(p):
            for flags, kwargs in specs:
                p.add_argument(*flags, **kwargs)
        return add

    command("extract", cmd_extract, "stage one: extract tapped-layer features into a feature store",
            extraction(), description="Run a frozen backbone over images and store the pooled activations of the "
                                      "layers you name.", epilog=EXTRACT_EXAMPLES)
    command("classify", cmd_classify, "stage two: train classifiers on a store's taps and compare them",
            extraction(ClassifySettings),
            description="Train each classifier on each tap of one feature store (no image is decoded) and report "
                        "val accuracy (which chooses) and test accuracy, per-class precision/recall/F1, confusion "
                        "matrices, fit time and trainable parameters.", epilog=CLASSIFY_EXAMPLES)
    command("sweep", cmd_sweep, "linear-probe accuracy of every tap, low to high, as a table and a plot",
            extraction(ClassifySettings),
            description="Which layer should I use? For every tap of the store: val and test accuracy of the linear "
                        "probe, feature dimensions, the forward-pass cost of reaching the tap, and the Dense-head "
                        "parameters flatten and avg pooling imply.",
            epilog="example:\n  layertap sweep --data ../shared/data/flowers17 --split-file "
                   "../shared/data/flowers17-split.csv --weights hed-bsds500")
    command("finetune", cmd_finetune, "stage three: fine-tune the backbone end to end and report the gain over "
                                      "stage two", extraction(FinetuneSettings),
            description="LP-FT: phase 1 is stage two's linear probe folded into the network; phase 2 unfreezes "
                        "the backbone from a named layer and trains with a low learning rate, keeping the epoch "
                        "that is best on val. Tested on stage two's test images, with the gain over stage two's "
                        "probe and over its best model on val, each with a bootstrap interval.",
            epilog=FINETUNE_EXAMPLES)
    command("predict", cmd_predict, "classify images with a trained model folder", arguments(
        (["model"], dict(help="a model folder written by `layertap classify` or `layertap finetune`")),
        (["images"], dict(nargs="+", help="image files or folders")),
        (["--top-k"], dict(type=_positive_int, default=3, help="classes shown per image (default: %(default)s)")),
        (["--batch-size"], dict(type=_positive_int, default=32,
                                help="images per forward pass (default: %(default)s)")),
        (["--output"], dict(help="write .csv or .json instead of printing")),
        (["--trust"], dict(action="store_true", help="also load a pickled model (model.joblib) or scikit-learn "
                                                    "types outside layertap's trusted list: that runs code from the "
                                                    "folder, so only for folders whose origin you trust"))),
        description="Runs the backbone as the model's manifest says and prints (or writes) the top-k classes of "
                    "each image. Unreadable images are reported, not fatal.",
        epilog="example:\n  layertap predict models/<run>/block4_pool-logreg photos/ --output predictions.csv")
    command("layers", cmd_layers, "list a backbone's layers, shapes, parameters and recommended taps", arguments(
        (["backbone"], dict(help=f"a registered backbone: {', '.join(BACKBONES)}")),
        (["--size"], dict(type=int, default=224, help="image side in pixels (default: %(default)s)"))),
        description="Every layer of the backbone at the given image size, with the features avg and flatten "
                    "pooling would give and the Dense(256) head flatten implies.")
    command("inspect", cmd_inspect, "show a feature store's contents and provenance",
            arguments((["store"], dict(help="a .h5 feature store"))))
    command("sample", cmd_sample, "build the embedded sample set (offline) and print its folder",
            arguments((["--dest"], dict(default=None, help="folder (default: $LAYERTAP_SAMPLE_DIR, else "
                                                           "~/.cache/layertap/sample-v<version>)"))))
    command("fetch", cmd_fetch, "download a public data set from its official page (with checksum)", arguments(
        (["dataset"], dict(choices=("flowers17",))),
        (["--dest"], dict(default="data/flowers17", help="target folder (default: %(default)s)")),
        (["--archive"], dict(help="a local 17flowers.tgz instead of downloading")),
        (["-q", "--quiet"], dict(action="store_true"))),
        description=textwrap.dedent("""\
            Download the Oxford 17 Category Flower Dataset (17flowers.tgz, md5-checked) and
            unpack it into one folder per class. Offline, pass --archive with a copy."""))
    return parser


def main(argv: list[str] | None = None) -> int:
    set_backend_defaults()
    if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 print as their own bytes
        sys.stdout.reconfigure(errors="surrogateescape")
    argv = sys.argv[1:] if argv is None else list(argv)
    named = [a for a in argv if a in COMMANDS][:1]  # build only that command's options: no stage imports another
    args = build_parser(named or COMMANDS).parse_args(argv)
    if args.verbose:
        os.environ["LAYERTAP_VERBOSE"] = "1"
    # Our own progress lines at INFO; other libraries only from WARNING up (JAX logs its absent TPU at INFO).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="layertap: %(levelname)s: %(message)s" if args.verbose else "layertap: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    terminated = stop_on_sigterm()
    try:
        return args.func(args)
    except DiskFullError as exc:
        print(f"layertap: error: {exc}", file=sys.stderr)
        return 1
    except (LayertapError, ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"layertap: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # The reader of our output left (``layertap inspect STORE | head``): no traceback, and none at exit
        # when Python flushes what is left.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"layertap: error: no space left on the disk writing {exc.filename or 'a file'}; free some "
                  "space and run the same command again", file=sys.stderr)
        elif args.verbose:
            raise
        else:  # a path that is not what it should be (a file where a folder goes, no permission): one line
            where = f" {exc.filename}" if exc.filename else ""
            print(f"layertap: error: `layertap {args.command}` could not use{where}: {exc.strerror or exc}; "
                  "-v shows where", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        how = "terminated" if terminated() else "interrupted"
        print(f"layertap: {how}; committed extraction shards are kept, and the same command resumes from them: "
              f"layertap {shlex.join(argv)}; model folders are written only when their training completes",
              file=sys.stderr)
        return 143 if terminated() else 130


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has left (a broken pipe elsewhere is a real error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no such file descriptor
        return False


def entry() -> None:
    """The ``layertap`` command: :func:`main`, and after Ctrl-C or SIGTERM an exit that skips the slow interpreter
    teardown.

    Everything that must be cleaned up (decoding processes, shared memory, the store lock, temporary files)
    is by then; tearing down a loaded TensorFlow would add about a second before the prompt returns.
    """
    code = main()
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
