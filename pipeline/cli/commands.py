"""What each ``layertap`` command does: calls the stage functions and prints their summaries."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.backbones.build import layer_rows
from pipeline.backbones.pooling import dense_params, pooled_dims
from pipeline.backbones.registry import get_backbone
from pipeline.classification.settings import ClassifySettings
from pipeline.core.errors import LayertapError
from pipeline.core.settings import settings_from_args
from pipeline.core.text import plural
from pipeline.data.datasets import fetch_flowers17
from pipeline.data.sample import ensure_sample
from pipeline.extraction.engines import get_engine
from pipeline.extraction.extract import ExtractSettings, extract_features
from pipeline.finetuning.settings import FinetuneSettings
from pipeline.prediction.batch import predict_to_file
from pipeline.prediction.export import export_model
from pipeline.prediction.predict import list_image_files, predict
from pipeline.runs.page import recommendation_line, write_run_page
from pipeline.runs.reports import (
    comparison_table,
    extract_summary,
    format_table,
    gain_text,
    stage_table,
    store_summary,
    sweep_table,
)
from pipeline.runs.summary import collect_rows
from pipeline.store.feature_store import FeatureStore


def _extract_settings(args):
    options = settings_from_args(get_engine(args.engine).Options, args)
    return settings_from_args(ExtractSettings, args, engine_options=options)


def cmd_extract(args) -> int:
    settings = _extract_settings(args)
    result = extract_features(settings)
    print(extract_summary(result, settings))
    return 0


# Extraction flags that describe a store: given with --store, each must agree with the store's manifest.
STORE_FLAGS = (("--backbone", "backbone", ("backbone",)), ("--size", "size", ("image_size",)),
               ("--pool", "pool", ("pooling",)), ("--weights", "weights", ("weights_arg", "weights")),
               ("--resize", "resize", ("resize",)))


def _store_for(args) -> str:
    """The store a stage-two command works on: --store, else the extraction its flags describe."""
    if args.store:
        _check_store_flags(args, args.store)
        return args.store

    settings = _extract_settings(args)
    result = extract_features(settings)
    if not result.cache_hit:
        print(extract_summary(result, settings))
    return str(result.store_path)


def _check_store_flags(args, store: str) -> None:
    """A flag given with --store that contradicts the store (a vgg16 store with --backbone resnet50) is refused:
    training would silently use the store's features, not the ones the flag asks for."""
    given = [(flag, dest, fields) for flag, dest, fields in STORE_FLAGS
             if any(a == flag or a.startswith(flag + "=") for a in getattr(args, "argv", ()))]
    if not given:
        return
    manifest = FeatureStore(store).manifest
    for flag, dest, fields in given:
        asked, made = str(getattr(args, dest)), [str(getattr(manifest, field)) for field in fields]
        if asked not in made:
            raise LayertapError(f"{flag} {asked} contradicts --store {store}, which was made with {flag} {made[0]}; "
                                f"drop {flag} to train on that store, or drop --store to use (or extract) the store "
                                "the flags describe")


def cmd_classify(args) -> int:
    from pipeline.classification.classify import classify

    settings = settings_from_args(ClassifySettings, args, store=_store_for(args), layers=args.layers)
    report = None if not args.progress else (lambda r: print(
        f"  {r['tap']:<18} {r['classifier']:<12} val acc {r['val_accuracy']:.3f}  ({r['fit_seconds']:.1f} s)"))
    result = classify(settings, progress=report, bars=args.progress)
    print(f"\n{comparison_table(result.rows)}\n")
    _print_answer(result.summary)
    return 0


def _print_answer(summary) -> None:
    """The run's recommendation (every stage's models in its folder, best on val) and where its page is."""
    verdict = summary.finetune_verdict()
    print(recommendation_line(summary) + (f"\n{verdict}" if verdict else "")
          + f"\nthe whole answer, with plots: {summary.run_dir / 'index.html'}")


def cmd_sweep(args) -> int:
    from pipeline.classification.classify import sweep

    report = None if not args.progress else (lambda r: print(f"  {r['tap']:<18} val acc {r['val_accuracy']:.3f}"))
    settings = settings_from_args(ClassifySettings, args, store=_store_for(args), layers=args.layers)
    run_dir, rows = sweep(settings, progress=report, bars=args.progress)
    print(f"\n{sweep_table(rows)}\n\nplot: {run_dir / 'sweep.png'}; table: {run_dir / 'sweep.md'}")
    _print_answer(collect_rows(run_dir))
    return 0


def cmd_finetune(args) -> int:
    from pipeline.finetuning.finetune import finetune

    model_dir, metrics = finetune(settings_from_args(FinetuneSettings, args, store=_store_for(args)))
    print(f"\nstage two vs stage three on the same {metrics['n_test']} test images "
          f"({metrics['tap']}):\n{stage_table(metrics)}\n\ngain over stage two's probe on {metrics['tap']}: "
          f"{gain_text(metrics['gain_over_probe'])}\n"
          f"model, report and learning curves in {model_dir}/\n")
    _print_answer(collect_rows(model_dir.parent, metrics["store_key"], metrics["test_rows_sha256"]))
    return 0


def cmd_report(args) -> int:
    _print_answer(write_run_page(args.run))
    return 0


def cmd_export(args) -> int:
    model = args.model or _only_run(Path(args.models))
    out = export_model(model, args.format, args.out, trust=args.trust)
    info = json.loads(Path(f"{out}.json").read_text())
    print(f"exported {info['source']} ({info['tap']} + {info['classifier']}) to {out}\n"
          f"input: {info['input']} with size {info['image_size']} (images resized as the store did: "
          f"{info['resize']}, {info['interpolation']}); output: {info['output']}; class names and recipe in "
          f"{out}.json")
    return 0


def _only_run(models: Path) -> Path:
    """The one run folder in ``models``; with several, the user names one."""
    runs = sorted(p for p in models.glob("*/comparison.json")) if models.is_dir() else []
    if len(runs) != 1:
        listed = ", ".join(str(p.parent) for p in runs) or f"none in {models}/"
        raise LayertapError(f"name the model or run to export: layertap export models/<run>[/<model>]; runs: {listed}")
    return runs[0].parent


def cmd_predict(args) -> int:
    files = list_image_files(args.images)
    if args.output and Path(args.output).suffix.lower() == ".json":
        raise LayertapError(f"--out {args.output}: write .csv or .parquet (one row per image, written as they are "
                            "computed); `layertap predict` without --out prints them")
    if args.output:
        options = settings_from_args(get_engine(args.engine).Options, args)
        result = predict_to_file(args.model, files, args.output, top_k=args.top_k, batch_size=args.batch_size,
                                 workers=args.workers, shard_size=args.shard_size, engine=args.engine,
                                 engine_options=options,
                                 decoder=args.decoder, features_dir=args.features, reuse=args.reuse,
                                 trust=args.trust, progress=args.progress)
        print(f"{plural(result.n_images - result.n_failed, 'image')} classified, {result.n_failed} not readable "
              f"({result.n_decoded:,} decoded, {result.n_reused:,} read from earlier stores); written to "
              f"{result.out}")
        return 0
    for r in predict(args.model, files, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers,
                     trust=args.trust):
        top = "  ".join(f"{c} {p:.3f}" for c, p in r.get("top", []))
        print(f"{r['path']}: {top or 'ERROR ' + r['error']}")
    return 0


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
