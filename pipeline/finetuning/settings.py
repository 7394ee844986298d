"""Stage three's settings: what it trains and where it writes (flags of ``layertap finetune``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.settings import check_choice, check_int, option
from pipeline.finetuning.compose import SCHEDULES, parse_augmentation

HEADS = ("probe", "linsvm", "dense")
PHASE1_DATA = ("store", "images")


@dataclass(frozen=True)
class FinetuneSettings:
    """What stage three trains and where it writes; validated when built. Each field's ``help`` says
    what it does.

    The split (``seed``, ``test_fraction``, ``val_fraction``) must match stage two's, so both stages
    test on the same images; the report checks it.
    """

    store: str = option("", "the feature store whose images, split, backbone, weights and pooling are used",
                        cli=False)
    layer: str | None = option(None, "tap to fine-tune at (default: the tap of stage two's best model on val, "
                                     "else the tap whose linear probe is best on val)", group="fine-tuning")
    head: str = option("probe", "phase 1's head: probe (stage two's logistic regression, folded into a softmax "
                                "layer: LP-FT), linsvm (stage two's linear SVM, folded with a temperature fitted on "
                                "the train rows) or dense (a Dense hidden layer trained from scratch)",
                       choices=HEADS, group="fine-tuning")
    unfreeze_from: str | None = option(None, "first layer trained in phase 2 (default: the tap's last convolution, "
                                             "e.g. block4_conv3 for block4_pool, conv5_block3_3_conv for "
                                             "conv5_block3_out; bench/NOTES.md says why)", metavar="LAYER",
                                       group="fine-tuning")
    fine_tune_epochs: int = option(3, "most epochs of phase 2; 0 stops after phase 1", group="fine-tuning")
    fine_tune_learning_rate: float = option(1e-4, "peak Adam learning rate of phase 2 (chosen on val, bench/NOTES.md)",
                                            flag="--fine-tune-lr", group="fine-tuning")
    schedule: str = option("cosine", "phase 2's learning rate: cosine (warm-up, then cosine decay to 0 at the "
                                     "last epoch) or constant", choices=SCHEDULES, group="fine-tuning")
    warmup_epochs: float = option(0.5, "epochs of linear warm-up before the cosine decay", group="fine-tuning")
    batch_size: int = option(32, "images (or feature rows) per training step", flag="--train-batch-size",
                             group="fine-tuning")
    patience: int = option(3, "epochs without a better val accuracy (then val loss) before a phase stops",
                           group="fine-tuning")
    fine_tune_minutes: float | None = option(
        None, "wall-clock budget of phase 2: it stops after the batch that spends it (that epoch is still "
              "validated, the best weights kept); for CPUs where an epoch takes minutes (default: no limit)",
        metavar="M", group="fine-tuning")
    augment: str = option("flip,rotation,zoom", "none, or comma list of flip[=horizontal|vertical|"
                                                "horizontal_and_vertical], rotation[=0.1], zoom[=0.1], "
                                                "contrast[=0.1]", metavar="SPEC", group="fine-tuning")
    phase1: str = option("store", "where phase 1's head learns: store (the stored features of the train rows; "
                                  "for the probe, that is its scikit-learn fit) or images (then it trains on "
                                  "augmented images through the frozen backbone, from the probe or from scratch)",
                         choices=PHASE1_DATA, group="fine-tuning")
    epochs: int = option(50, "most epochs of phase 1 where it trains in Keras (--head dense, or --phase1 images)",
                         group="fine-tuning")
    learning_rate: float = option(1e-3, "Adam learning rate of phase 1 where it trains in Keras", flag="--lr",
                                  group="fine-tuning")
    hidden_units: int = option(256, "--head dense: the hidden layer's width, 0 for none", group="fine-tuning")
    dropout: float = option(0.5, "--head dense: dropout after the hidden layer", group="fine-tuning")
    data_root: str | None = option(None, "the store's images, if they moved since extraction", metavar="DIR",
                                   group="fine-tuning")
    out_dir: str = option("models", "folder of the runs", flag="--models", group="stage two")
    run: str | None = option(None, "run folder name (default: the store's name)", group="stage two")
    seed: int = option(0, "seed of every random choice; also the split seed, so it must match stage two's")
    test_fraction: float = option(0.25, "share of test images where the store records no split")
    val_fraction: float = option(0.15, "share of validation images where the store records no split (or no "
                                       "val rows)")
    workers: int = option(0, "decoding threads; 0: one per core")
    progress: bool = option(True, "progress bars and a line per epoch", flag="--quiet",
                            flag_help="no progress bars or epoch lines")

    def __post_init__(self):
        if not self.store:
            raise ValueError("store is required: the feature store to fine-tune from")
        parse_augmentation(self.augment)
        check_choice("head", self.head, HEADS)
        check_choice("phase1", self.phase1, PHASE1_DATA)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int(self, (("epochs", 1), ("fine_tune_epochs", 0), ("batch_size", 1), ("patience", 1),
                         ("hidden_units", 0), ("workers", 0)))
        for name in ("learning_rate", "fine_tune_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive")
        if self.fine_tune_minutes is not None and not self.fine_tune_minutes >= 0:
            raise ValueError(f"fine_tune_minutes={self.fine_tune_minutes!r} must be >= 0 (or None: no limit)")
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs!r} must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name}={getattr(self, name)!r} must be between 0 and 0.5")
