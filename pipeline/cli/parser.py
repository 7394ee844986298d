"""The ``layertap`` argument parser: every command, its flags (built from the settings dataclasses) and examples."""

from __future__ import annotations

import argparse
import textwrap

from pipeline.backbones.registry import BACKBONES
from pipeline.classification.settings import ClassifySettings
from pipeline.cli import commands as c
from pipeline.core.runtime import __version__
from pipeline.core.settings import add_settings_options, split_list
from pipeline.data.gpu_decode import DECODER_CHOICES
from pipeline.extraction.engines import ENGINES
from pipeline.extraction.extract import ExtractSettings
from pipeline.finetuning.settings import FinetuneSettings
from pipeline.prediction.export import FORMATS

COMMANDS = ("extract", "classify", "sweep", "finetune", "report", "export", "predict", "layers", "inspect", "sample",
            "fetch")


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
  layertap classify --store S.h5 --layers block3_pool+block4_pool --classifiers linsvm   # both taps side by side
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



def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the flag in its message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not valid; it must be an integer >= 1")
    return value


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

    def extraction(*stage_settings, own=()):
        """The extraction flags; for a stage on a store, --store first, ``own`` (``(flags, kwargs)``: where the
        command's flag differs from its settings field's) and the stage's own flags."""
        def add(p):
            added = set()
            if stage_settings:
                group = p.add_argument_group("stage two")
                group.add_argument("--store", help="a feature store; without it, the store the extraction flags "
                                                   "below describe is used (extracted first if missing: a cache "
                                                   "hit decodes nothing)")
                for flags, kwargs in own:
                    group.add_argument(*flags, **kwargs)
                    added.add(flags[-1])
                added = add_settings_options(p, *stage_settings, added=added)
            add_settings_options(p, ExtractSettings, *(e.Options for e in ENGINES.values()), added=added)
        return add

    def arguments(*specs):
        def add(p):
            for flags, kwargs in specs:
                p.add_argument(*flags, **kwargs)
        return add

    command("extract", c.cmd_extract, "stage one: extract tapped-layer features into a feature store",
            extraction(), description="Run a frozen backbone over images and store the pooled activations of the "
                                      "layers you name.", epilog=EXTRACT_EXAMPLES)
    command("classify", c.cmd_classify, "stage two: train classifiers on a store's taps and compare them",
            extraction(ClassifySettings),
            description="Train each classifier on each tap of one feature store (no image is decoded) and report "
                        "val accuracy (which chooses) and test accuracy, per-class precision/recall/F1, confusion "
                        "matrices, fit time and trainable parameters.", epilog=CLASSIFY_EXAMPLES)
    command("sweep", c.cmd_sweep, "linear-probe accuracy of every tap, low to high, as a table and a plot",
            extraction(ClassifySettings, own=[(["--classifiers"], dict(
                type=split_list, default=("logreg",), metavar="NAME",
                help="the linear probe fit on each tap: logreg (C by cross-validation on train) or probe "
                     "(streamed, C on val; on the GPU where there is one) (default: logreg)"))]),
            description="Which layer should I use? For every tap of the store: val and test accuracy of the linear "
                        "probe, feature dimensions, the forward-pass cost of reaching the tap, and the Dense-head "
                        "parameters flatten and avg pooling imply; then which layers: the pairs of the three best "
                        "taps on val and all taps, side by side (a+b, one model on their features together).",
            epilog="example:\n  layertap sweep --data ../shared/data/flowers17 --split-file "
                   "../shared/data/flowers17-split.csv --weights hed-bsds500")
    command("finetune", c.cmd_finetune, "stage three: fine-tune the backbone end to end and report the gain over "
                                      "stage two", extraction(FinetuneSettings),
            description="LP-FT: phase 1 is stage two's linear probe folded into the network; phase 2 unfreezes "
                        "the backbone from a named layer and trains with a low learning rate, keeping the epoch "
                        "that is best on val. Tested on stage two's test images, with the gain over stage two's "
                        "probe and over its best model on val, each with a bootstrap interval.",
            epilog=FINETUNE_EXAMPLES)
    command("report", c.cmd_report, "write a run folder's index.html: the recommended model and the evidence",
            arguments((["run"], dict(help="a run folder, models/<run>"))),
            description="Compare every model folder of the run (stage two and three) on val, recommend the best, "
                        "and write comparison.md, comparison.json and index.html (plots, per-class table, the "
                        "test images the recommended model gets most wrong). classify, sweep and finetune write "
                        "it too; this rewrites it after models were added or removed by hand.",
            epilog="example:\n  layertap report models/flowers17-v2-vgg16-hed-bsds500-224px-avg-<key>")
    command("export", c.cmd_export, "one file from pixels to class probabilities (ONNX, SavedModel, .keras)",
            arguments(
        (["model"], dict(nargs="?", help="a model folder, or a run folder: its recommended model (default: the one "
                                         "run in --models)")),
        (["--format"], dict(choices=tuple(FORMATS), default="onnx", help="onnx (onnxruntime, no TensorFlow), "
                                                                          "saved_model or keras (default: onnx)")),
        (["--out"], dict(help="the file (default: beside the model folder, named after it)")),
        (["--models"], dict(default="models", help="folder of the runs (default: %(default)s)")),
        (["--trust"], dict(action="store_true", help="as for predict: also load pickled models"))),
            description="Export the backbone up to the tap, the store's pooling and the classifier as one network: "
                        "uint8 RGB pixels (n, size, size, 3) in, class probabilities out. Linear models (logreg, "
                        "linsvm) fold into one softmax layer; the Dense head and fine-tuned models go as they are; "
                        "a kNN is not a network and is refused. The class names and the resize recipe are written "
                        "to <out>.json (and into the ONNX file's metadata).",
            epilog="examples:\n  layertap export models/<run>                 # the run's recommended model, as ONNX\n"
                   "  layertap export models/<run>/block4_pool-logreg --format saved_model --out serving/1")
    def predict_options(p):
        arguments(
            (["model"], dict(help="a model folder written by `layertap classify` or `layertap finetune`")),
            (["images"], dict(nargs="+", help="image files or folders (every non-hidden file under a folder)")),
            (["--top-k"], dict(type=_positive_int, default=3, help="classes per image (default: %(default)s)")),
            (["--batch-size"], dict(type=_positive_int, default=32,
                                    help="images per forward pass (default: %(default)s)")),
            (["--out", "--output"], dict(dest="output", metavar="FILE", help=(
                "run as a batch job writing FILE (.csv, or .parquet with pyarrow): one row per image, in path "
                "order; constant memory; a killed run resumes; without it the top classes are printed"))),
            (["--features"], dict(metavar="DIR", help="with --out: where the images' features are stored and "
                                                      "earlier stores are looked for (default: the folder of the "
                                                      "model's store; features/ where it is not here)")),
            (["--no-reuse"], dict(dest="reuse", action="store_false", help="with --out: decode every image, even "
                                  "those a store of the model's settings already has")),
            (["--decoder"], dict(choices=DECODER_CHOICES, help="with --out: stage one's --decoder (default: the "
                                                               "one the model's store was made with)")),
            (["-q", "--quiet"], dict(dest="progress", action="store_false", help="no progress bars")),
            (["--trust"], dict(action="store_true", help="also load a pickled model (model.joblib) or scikit-learn "
                                                        "types outside layertap's trusted list: that runs code from "
                                                        "the folder, so only for folders whose origin you trust")))(p)
        add_settings_options(p, *(e.Options for e in ENGINES.values()),
                             added={"--batch-size", "--out"} | {f"--{f}" for f in ("data", "layers")})
        speed = next(g for g in p._action_groups if g.title == "speed (not part of the cache key)")
        speed.add_argument("--engine", choices=tuple(ENGINES), default="local",
                           help="with --out: where the images are decoded and run, as for extract (default: local)")
        speed.add_argument("--workers", type=int, default=0, help="decoding processes; 0: one per core, at most 16")
        speed.add_argument("--shard-size", type=_positive_int, default=512,
                           help="with --out: images per committed shard; a killed job resumes from the last one")

    command("predict", c.cmd_predict, "classify images with a trained model folder", predict_options,
            description="Runs the backbone as the model's manifest says and prints the top-k classes of each "
                        "image. With --out it is a batch job on stage one's machinery: the model's tap is "
                        "extracted for the images into a store (shards committed as they are computed, so a "
                        "killed run resumes; --engine ray; images that a store of the model's settings already "
                        "has are read from it, not decoded), then the classifier reads the store a batch at a "
                        "time. Unreadable images get their reason, never stop the job.",
            epilog="examples:\n  layertap predict models/<run>/block4_pool-logreg photo.jpg\n"
                   "  layertap predict models/<run>/block4_pool-logreg photos/ --out predictions.csv\n"
                   "  layertap predict models/<run>/block4_pool-logreg s3-mount/ --out p.parquet --engine ray "
                   "--ray-address head:6379")
    command("layers", c.cmd_layers, "list a backbone's layers, shapes, parameters and recommended taps", arguments(
        (["backbone"], dict(help=f"a registered backbone: {', '.join(BACKBONES)}")),
        (["--size"], dict(type=int, default=224, help="image side in pixels (default: %(default)s)"))),
        description="Every layer of the backbone at the given image size, with the features avg and flatten "
                    "pooling would give and the Dense(256) head flatten implies.")
    command("inspect", c.cmd_inspect, "show a feature store's contents and provenance",
            arguments((["store"], dict(help="a .h5 feature store"))))
    command("sample", c.cmd_sample, "build the embedded sample set (offline) and print its folder",
            arguments((["--dest"], dict(default=None, help="folder (default: $LAYERTAP_SAMPLE_DIR, else "
                                                           "~/.cache/layertap/sample-v<version>)"))))
    command("fetch", c.cmd_fetch, "download a public data set from its official page (with checksum)", arguments(
        (["dataset"], dict(choices=("flowers17",))),
        (["--dest"], dict(default="data/flowers17", help="target folder (default: %(default)s)")),
        (["--archive"], dict(help="a local 17flowers.tgz instead of downloading")),
        (["-q", "--quiet"], dict(action="store_true"))),
        description=textwrap.dedent("""\
            Download the Oxford 17 Category Flower Dataset (17flowers.tgz, md5-checked) and
            unpack it into one folder per class. Offline, pass --archive with a copy."""))
    return parser
