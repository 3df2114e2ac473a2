"""The ``multitask`` command: argparse only. Each subcommand parses, calls the library, prints.

Every default and choice comes from the library (:mod:`multitask.settings` and the dataclasses there), so it is
written once. Library errors (:class:`multitask.errors.MultitaskError`) are printed as one line, with settings
named by their flags, and exit with status 2; anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from multitask.errors import MultitaskError, cli_message
from multitask.settings import (
    BATCH_SIZE,
    DEFAULT_SPLIT_METHOD,
    ENGINES,
    EXPORT_CALIBRATION_IMAGES,
    EXPORT_CHECK_IMAGES,
    EXPORT_FORMATS,
    SERVE_HOST,
    SERVE_PORT,
    SPLIT_METHODS,
    SPLITS,
    STRATEGIES,
    TASK_CHOICES,
    WEIGHTINGS,
    DemoConfig,
    GroupingParams,
    SyntheticSettings,
    TrainConfig,
    defaults,
)

TRAIN = defaults(TrainConfig)
DEMO = defaults(DemoConfig)
SYNTHETIC = defaults(SyntheticSettings)
GROUPING = defaults(GroupingParams)


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.15,0.15, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.15,0.15, got {text!r}")
    return parts  # type: ignore[return-value]


def _print_table(title: str, frame) -> None:
    print(f"\n{title}")
    print(frame.to_string())


# ----------------------------------------------------------------------------------------------- data


def run_download(args: argparse.Namespace) -> int:
    from multitask.data import download

    path = download(args.dest)
    print(f"downloaded to {path}\nnext: multitask scan {path!s} --out split.csv")
    return 0


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", help="folder to download into (default: kagglehub's cache)")


def run_scan(args: argparse.Namespace) -> int:
    from multitask.data import counts_table, scan_tree
    from multitask.files import check_writable
    from multitask.splits import save_split, split_manifest
    from multitask.taxonomy import load_taxonomy

    if args.out:  # now, not after a grouped split of the full set (~30 minutes)
        check_writable(args.out, flag="$out")
    taxonomy = load_taxonomy(args.taxonomy)
    result = scan_tree(args.data, taxonomy=taxonomy, verify=args.verify, allow_unknown=args.allow_unknown)
    manifest, report = result.manifest, result.report
    _print_table("images per organ x cancer", counts_table(manifest))
    per_sub = manifest.groupby(["subclass", "organ", "cancer"]).size().rename("images").reset_index()
    _print_table("images per subclass", per_sub.set_index("subclass"))
    print(f"\n{len(manifest)} images in {manifest['subclass'].nunique()} subclasses under {report.root}")
    for count, what in ((report.ignored_files, "ignored {} non-image file(s)"),
                        (len(report.not_regular), "skipped {} image name(s) that are not regular files (FIFO, ...)"),
                        (len(report.skipped_links), "did not follow {} folder link(s) back into the tree (loops)"),
                        (report.duplicates, "dropped {} duplicate file(s) reached again through links"),
                        (len(report.unknown_folders), "skipped {} folder(s) not in the taxonomy")):
        if count:
            print(what.format(count))
    if report.missing_subclasses:
        print(f"not found: {', '.join(report.missing_subclasses)}")
    if report.unreadable:
        print(f"dropped {len(report.unreadable)} unreadable file(s):")
        for path, reason in report.unreadable.items():
            print(f"  {path}: {reason}")
    if args.out:
        split = split_manifest(manifest, fractions=args.fractions, seed=args.seed, method=args.split,
                               min_inliers=args.min_inliers, cache_dir=args.keypoint_cache)
        save_split(split, args.out)
        sizes = split["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
        print(f"wrote {args.out} ({', '.join(f'{k} {v}' for k, v in sizes.items())})")
    return 0


def add_scan(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="dataset folder (the Kaggle download, Multi Cancer/, or one type folder)")
    add_taxonomy_options(p)
    p.add_argument("--verify", action="store_true", help="decode every file once and drop unreadable ones")
    p.add_argument("--out", help="write the manifest with a split column to this CSV")
    add_split_options(p)
    p.add_argument("--keypoint-cache", metavar="DIR",
                   help="grouped split: cache ORB keypoints here, so a second scan of the same files is fast")


def add_taxonomy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--taxonomy", help="CSV mapping subclass -> type_folder, organ, cancer, note")
    p.add_argument("--allow-unknown", action="store_true",
                   help="skip image folders that are not in the taxonomy instead of stopping")


def add_split_options(p: argparse.ArgumentParser, *, seed_help: str = "random seed of the split") -> None:
    p.add_argument("--fractions", type=_fractions, default=TRAIN["fractions"],
                   help=f"train,val,test fractions (default {','.join(map(str, TRAIN['fractions']))})")
    p.add_argument("--seed", type=int, default=TRAIN["seed"], help=f"{seed_help} (default %(default)s)")
    p.add_argument("--split", choices=SPLIT_METHODS, default=DEFAULT_SPLIT_METHOD,
                   help="grouped (default): stratified by subclass, and the augmented siblings of one source image "
                        "stay in one split; random: files split independently, so siblings leak across splits")
    p.add_argument("--min-inliers", type=int, default=None,
                   help="grouped split: RANSAC inliers that make two images siblings (default "
                        f"{GROUPING['min_inliers']})")


def run_audit_split(args: argparse.Namespace) -> int:
    from multitask.audit import audit_split, read_split_table, write_audit

    frame = read_split_table(args.split_csv)
    by = "subclass" if "subclass" in frame.columns else "the whole set (no subclass column)"
    print(f"checking {len(frame)} images of {args.split_csv}; candidates within {by}, k={args.k}, "
          f"min inliers {args.min_inliers}")
    audit = audit_split(frame, params=GroupingParams(k=args.k, min_inliers=args.min_inliers), cache_dir=args.cache_dir,
                        workers=args.workers)
    csv = Path(args.split_csv).resolve()
    out = Path(args.out) if args.out else csv.parent / f"{csv.stem}_audit"  # one folder per CSV: no overwriting
    written = write_audit(audit, out, examples=args.examples)
    print("\nnear-duplicate pairs across splits (" + ", ".join(f"{s} {n}" for s, n in audit.sizes.items()) + ")")
    for pair, count in audit.counts.items():
        print(f"  {pair:<12} {count}")
    for name, count in audit.leaked.items():
        print(f"  {name} images with a near-duplicate in an earlier split: {count} of {audit.sizes[name]}")
    if len(audit.pairs):
        worst = audit.pairs.head(args.examples).copy()
        for column in ("path_a", "path_b"):  # the last two path parts (subclass/file) fit on a line
            worst[column] = worst[column].map(lambda p: "/".join(Path(p).parts[-2:]))
        _print_table("worst pairs (most inliers)", worst)
    print(f"\nwrote {written['report']}\nwrote {written['contact_sheet']}")
    return 0


def add_audit_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("split_csv", help="CSV with path and split columns (subclass optional), from any tool")
    p.add_argument("--out", help="folder for audit.json and audit_pairs.png (default: SPLIT_CSV_STEM_audit/ next to "
                                 "the CSV)")
    p.add_argument("--k", type=int, default=GROUPING["k"],
                   help="candidates checked per image in each earlier split (default %(default)s)")
    p.add_argument("--min-inliers", type=int, default=GROUPING["min_inliers"],
                   help="geometric inliers that make two images near-duplicates (default %(default)s)")
    p.add_argument("--examples", type=int, default=8, help="pairs shown in the table and the contact sheet")
    p.add_argument("--cache-dir", help="cache ORB keypoints here (reused by later audits and grouped splits)")
    p.add_argument("--workers", type=int, help="threads (default: all cores)")


def run_demo_data(args: argparse.Namespace) -> int:
    from multitask.synthetic import DEMO_ROOT, generate

    out = generate(args.out, per_class=args.per_class, size=args.size, seed=args.seed,
                   with_bad_files=args.with_bad_files)
    print(f"wrote synthetic data to {out / DEMO_ROOT}\nnext: multitask scan {out}")
    return 0


def add_demo_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write into")
    p.add_argument("--per-class", type=int, default=SYNTHETIC["per_class"],
                   help="images per subclass (default %(default)s)")
    p.add_argument("--size", type=int, default=SYNTHETIC["size"], help="image side in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=SYNTHETIC["seed"], help="default %(default)s")
    p.add_argument("--with-bad-files", action="store_true",
                   help="also write an empty, a truncated, a text and a PNG-named-.jpg file")


# ----------------------------------------------------------------------------------------------- train


def run_train(args: argparse.Namespace) -> int:
    from multitask.rundir import CONFIG_FILE, HISTORY_FILE, HISTORY_PLOT, TENSORBOARD_DIR
    from multitask.train import train

    config = TrainConfig(**{name: getattr(args, name) for name in TRAIN if hasattr(args, name)})
    info = train(config)
    if not info.path.exists():  # a multi-worker run's other workers keep nothing (multitask.distribute)
        print(f"\nfinished: this worker trained in step with the chief, whose --out holds the run; {config.out} was "
              "not written")
        return 0
    print(f"\nfinished run in {info.path}")
    for label, name in (("model", info.model_path.name), ("config", CONFIG_FILE), ("split", info.split_path.name),
                        ("history", HISTORY_FILE), ("plot", HISTORY_PLOT), ("tensorboard", TENSORBOARD_DIR)):
        if (info.path / name).exists():
            print(f"  {label:<12} {info.path / name}")
    final, saved = info.config["final"], info.config["saved"]
    for task in info.tasks:
        print(f"  {task:<12} val accuracy {final.get(f'val_{task}_accuracy', float('nan')):.3f}, "
              f"val loss {final.get(f'val_{task}_loss', float('nan')):.3f} (the saved model: {saved['phase']} "
              f"epoch {saved['epoch'] + 1 if saved['epoch'] is not None else '?'})")
    print(f"  {'seconds':<12} " + ", ".join(f"{k} {v:.1f}" for k, v in info.config["timings"].items()))
    return 0


def _loss_weights(text: str) -> dict[str, float]:
    from multitask.settings import parse_loss_weights

    try:
        return parse_loss_weights(text)
    except MultitaskError as exc:
        raise argparse.ArgumentTypeError(cli_message(exc)) from None


def add_train(p: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**TRAIN)
    p.add_argument("--data", help="dataset folder to scan and split (not needed with --split-file)")
    p.add_argument("--out", required=True, help="run directory to write (rerun the same command to resume it)")
    p.add_argument("--task", choices=TASK_CHOICES, default=d.task,
                   help="joint: one backbone, two heads; organ / cancer: a single-task model (default %(default)s)")
    p.add_argument("--weights", default=d.weights,
                   help="backbone initialisation: imagenet, none, or an InceptionV3 notop .h5 file (default "
                        "%(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="epochs of the heads on cached backbone features (default %(default)s)")
    p.add_argument("--fine-tune-epochs", type=int, default=d.fine_tune_epochs,
                   help="then epochs of end-to-end fine-tuning on augmented images (default %(default)s)")
    p.add_argument("--unfreeze-from", default=d.unfreeze_from,
                   help="first backbone layer to fine-tune; BatchNorm stays frozen (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="default %(default)s")
    p.add_argument("--fine-tune-learning-rate", type=float, default=d.fine_tune_learning_rate,
                   help="default: a tenth of --learning-rate")
    p.add_argument("--loss-weights", type=_loss_weights, default=d.loss_weights,
                   help="static weight of each head's loss, e.g. organ=1.0,cancer=0.5 (default 1 each)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=d.weighting,
                   help="static: --loss-weights; uncertainty: learned (Kendall et al. 2018) (default %(default)s)")
    p.add_argument("--balance", action="store_true", help="weight samples so each task's classes count equally")
    p.add_argument("--split-file", help="reuse this saved split (from `multitask scan --out`) instead of --data")
    add_split_options(p, seed_help="random seed of the split, the initialisation and the data order")
    add_taxonomy_options(p)
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="tf.distribute: mirrored = all local GPUs (or CPUs), multiworker = TF_CONFIG cluster")
    p.add_argument("--cache-dir", help="where backbone features are cached (default RUN_DIR/cache)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stopping: epochs without a better validation loss (default %(default)s)")
    p.add_argument("--target-sensitivity", type=float, default=d.target_sensitivity,
                   help="the malignancy threshold is chosen on the validation split as the highest one whose "
                        "sensitivity (Malignant recall) reaches this (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of ours in --out (only the files it owns; other files stay)")


# ----------------------------------------------------------------------------------------------- evaluate / predict


def run_evaluate(args: argparse.Namespace) -> int:
    from multitask.evaluate import METRICS_FILE, MODEL_CARD_FILE, REPORT_FILE, evaluate_run, summary_table
    from multitask.report import overlap_note

    metrics = evaluate_run(args.run_dir, data=args.data, split=args.split, out=args.out,
                           batch_size=args.batch_size, explain=args.explain, calibrated=not args.uncalibrated,
                           threshold=args.threshold)
    source = metrics["source"]
    print(f"evaluated {metrics['n_images']} images ({source.get('split', 'folder')}: {source['path']})")
    _print_table("metrics", summary_table(metrics))
    for task in metrics["tasks"]:
        for note in metrics[task].get("notes", []):
            print(f"note ({task}): {note}")
    if "cancer" in metrics:
        cancer = metrics["cancer"]
        print(f"cancer: Malignant when P(Malignant) >= {cancer['threshold']:.3f} ({cancer['threshold_source']})")
    if "ood" in metrics:
        print(f"out of distribution: {metrics['ood']['n_flagged']} of {metrics['n_images']} images flagged")
    note = overlap_note(metrics["overlap"])
    if note:
        print(f"warning: {note}")
    if metrics["unreadable"]:
        print(f"\nleft out {len(metrics['unreadable'])} unreadable file(s):")
        for path, reason in metrics["unreadable"].items():
            print(f"  {path}: {reason}")
    out = Path(args.out or args.run_dir)
    print(f"\nwrote {out / METRICS_FILE}, {out / REPORT_FILE} (with figures) and {out / MODEL_CARD_FILE}")
    return 0


def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory (from `multitask train`)")
    p.add_argument("--data", help="evaluate every image of this folder (Kaggle layout) instead of the run's split")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="which split of the run's split.csv to evaluate (default %(default)s)")
    p.add_argument("--out", help="folder for metrics.json, report.md and figures (default: the run directory)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default %(default)s")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="add a figure of N evaluated images with each head's Grad-CAM heatmap to the report")
    add_operating_point_options(p)


SAMPLE_COLUMNS = ("true_organ", "organ", "organ_prob", "true_cancer", "cancer", "cancer_prob", "error")
PREDICT_ROWS_SHOWN = 50


def run_predict(args: argparse.Namespace) -> int:
    from multitask.files import check_writable
    from multitask.predict import Predictor, collect_images, sample_predictions, write_predictions
    from multitask.shards import Shard, predict_shard

    if args.merge is not None:
        return run_merge(args)
    if args.run_dir is None or bool(args.paths) == (args.sample is not None):
        print("multitask predict: error: give RUN_DIR and image PATHs or --sample N (not both, not neither), or "
              "--merge PART...", file=sys.stderr)
        return 2
    if args.shard and (args.sample is not None or not args.out):
        print("multitask predict: error: --shard K/N needs image PATHs and --out FILE", file=sys.stderr)
        return 2
    if args.out:
        check_writable(args.out, flag="$out")
    if args.explain:
        check_writable(args.explain, flag="$explain", folder=True)
    predictor = Predictor.from_run(args.run_dir, engine=args.engine, calibrated=not args.uncalibrated,
                                   threshold=args.threshold)
    if args.sample is not None:
        frame = sample_predictions(args.run_dir, args.sample, split=args.split, seed=args.seed,
                                   batch_size=args.batch_size, predictor=predictor)
        table = frame.set_index(frame["path"].map(os.path.basename).rename("file"))
        _print_table(f"{len(frame)} random {args.split} images: true vs predicted",
                     table[[c for c in SAMPLE_COLUMNS if c in table.columns]].round(3).dropna(axis=1, how="all"))
        hits = [c for c in frame.columns if c.endswith("_hit")]
        print("\n" + ", ".join(f"{c[:-4]} {int(frame[c].sum())}/{len(frame)} correct" for c in hits))
    elif args.shard:
        frame = predict_shard(predictor, collect_images(args.paths), Shard.parse(args.shard),
                              batch_size=args.batch_size, reject_ood=args.reject_ood)
        if args.explain:
            frame = predictor.write_explanations(frame, args.explain)
    else:
        frame = predictor.predict(args.paths, batch_size=args.batch_size, reject_ood=args.reject_ood)
        if args.explain:
            frame = predictor.write_explanations(frame, args.explain)
            print(f"wrote Grad-CAM overlays to {args.explain}")
        hidden = [c for c in frame.columns if c.startswith(("p_", "explain_")) or c == "malignancy_threshold"]
        shown = frame.drop(columns=hidden).round(3).fillna("")
        if not args.out:
            print(shown.head(PREDICT_ROWS_SHOWN).to_string(index=False))
            if len(frame) > PREDICT_ROWS_SHOWN:
                print(f"... {len(frame) - PREDICT_ROWS_SHOWN} more rows; pass --out FILE.csv to save them all")
    failed = int(frame["error"].notna().sum())
    flagged = int(frame["ood"].sum()) if "ood" in frame.columns else 0
    print(f"\npredicted {len(frame) - failed} of {len(frame)} file(s)" + (f"; {failed} unreadable" if failed else "")
          + (f"; {flagged} unlike the training images (ood)" if flagged else ""))
    if "cancer" in predictor.tasks:
        print(f"Malignant when P(Malignant) >= {predictor.threshold:.3f}"
              + (" (--threshold)" if args.threshold is not None else " (the run's operating point)"))
    if args.out:
        print(f"wrote {write_predictions(frame, args.out)}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from multitask.files import check_writable
    from multitask.predict import write_predictions
    from multitask.shards import merge_parts

    if args.run_dir is not None or args.paths or args.sample is not None or args.shard or not args.out:
        print("multitask predict: error: --merge takes only the PART files and --out FILE", file=sys.stderr)
        return 2
    check_writable(args.out, flag="$out")
    frame = merge_parts(args.merge)
    print(f"merged {len(args.merge)} part(s): {len(frame)} input(s), each exactly once")
    print(f"wrote {write_predictions(frame, args.out)}")
    return 0


def _predictions_file(text: str) -> str:
    if not text.lower().endswith((".csv", ".json")):
        raise argparse.ArgumentTypeError(f"expected a .csv or .json file name, got {text!r}")
    return text


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help="a finished run directory (from `multitask train`)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders (searched recursively) or globs")
    p.add_argument("--out", type=_predictions_file,
                   help="save all rows (with per-class probabilities) as .csv or .json")
    p.add_argument("--shard", metavar="K/N",
                   help="predict only the K-th of N equal shares of the sorted inputs (N machines each run one), "
                        "into --out; join the parts with --merge")
    p.add_argument("--merge", nargs="+", metavar="PART",
                   help="instead of predicting: join the parts that --shard wrote into --out, checking that every "
                        "input appears exactly once and no shard is missing")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default %(default)s")
    p.add_argument("--sample", type=int, metavar="N",
                   help="instead of PATHs: N random images of the run's own split, true vs predicted")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="split that --sample draws from (default %(default)s; train is refused)")
    p.add_argument("--seed", type=int, help="random seed of --sample (default: a new sample each time)")
    p.add_argument("--explain", metavar="DIR",
                   help="also write a Grad-CAM overlay PNG per image and head into DIR (adds explain_* columns)")
    p.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                   help="runtime of the forward pass: keras (default), onnx (fp32) or int8, from RUN/export/, "
                        "exported first when missing or stale; the columns are the same")
    p.add_argument("--reject-ood", action="store_true",
                   help="give no organ/cancer answer for images unlike the training images (ood), with a note")
    add_operating_point_options(p)


def add_operating_point_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uncalibrated", action="store_true",
                   help="show the raw softmax probabilities instead of the calibrated ones (keras engine)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="call an image Malignant when P(Malignant) >= P (default: the run's operating point, "
                        "chosen on validation for its target sensitivity; 0.5 with --uncalibrated)")


def run_export(args: argparse.Namespace) -> int:
    from multitask.export import LABELS_FILE, export_run

    result = export_run(args.run_dir, format=args.format, out=args.out, calibration=args.calibration,
                        check_images=args.check_images)
    print(f"self-check on {result.images} of the run's val/test images against the Keras model:")
    for name, diff in result.max_abs_diff.items():
        agreement = result.argmax_agreement.get(name)
        shown = f", argmax agreement {agreement:.1%}" if agreement is not None else ""
        print(f"  {name:<12} max |difference| {diff:.2e}{shown}")
    print(f"wrote {result.artifact}\nwrote {result.path / LABELS_FILE} and export.json ({result.seconds:.0f} s)")
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory (from `multitask train`)")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                   help="tf_saved_model (TF Serving), onnx (fp32: ONNX Runtime, OpenVINO...) or int8 (quantised)")
    p.add_argument("--out", help="folder to write (default RUN/export/FORMAT/)")
    p.add_argument("--calibration", type=int, default=EXPORT_CALIBRATION_IMAGES, metavar="N",
                   help="int8: calibrate on N images of the run's training split (default %(default)s)")
    p.add_argument("--check-images", type=int, default=EXPORT_CHECK_IMAGES, metavar="N",
                   help="check the export on N of the run's test/val images (default %(default)s)")


def run_serve(args: argparse.Namespace) -> int:
    from multitask.errors import ConfigError

    try:
        import uvicorn

        from multitask.serve.app import create_app
    except ImportError as exc:
        raise ConfigError(f"multitask serve needs FastAPI and uvicorn ({exc.name} is missing): "
                          "pip install 'multitask[serve]'") from None
    app = create_app(args.run_dir, engine=args.engine)  # the model loads once, here, before the port opens
    print(f"serving {args.run_dir} ({args.engine} engine) on http://{args.host}:{args.port}/  (Ctrl+C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory (from `multitask train`)")
    p.add_argument("--host", default=SERVE_HOST,
                   help="address to listen on (default %(default)s: this machine only; the API has no login)")
    p.add_argument("--port", type=int, default=SERVE_PORT, help="default %(default)s")
    p.add_argument("--engine", choices=ENGINES[:2], default=ENGINES[0],
                   help="runtime of the forward pass: keras (default) or onnx (fp32, from RUN/export/onnx/, "
                        "exported first when missing or stale)")


# ----------------------------------------------------------------------------------------------- demo


def run_demo(args: argparse.Namespace) -> int:
    from multitask.demo import PASS_ACCURACY, run_demo
    from multitask.evaluate import summary_table

    config = DemoConfig(**{name: getattr(args, name) for name in DEMO if hasattr(args, name)},
                        verbose=0 if args.quiet else 1)
    result = run_demo(config)
    preview = result.predictions.assign(path=result.predictions["path"].map(os.path.basename))
    columns = [c for c in ("path", "true_organ", "organ", "organ_prob", "true_cancer", "cancer", "cancer_prob")
               if c in preview.columns]
    _print_table("predictions for a few test images", preview[columns].round(3).set_index("path"))
    _print_table(f"test split metrics ({result.metrics['n_images']} images; the data is SYNTHETIC)",
                 summary_table(result.metrics))
    verdict = "PASS" if result.passed else "BELOW TARGET"
    print(f"\n{verdict}: accuracy >= {PASS_ACCURACY:.2f} on both heads is the demo's bar; took {result.seconds:.0f} s")
    print(f"data         {result.data_dir}")
    for name, file in (("run", ""), ("report", "report.md"), ("metrics", "metrics.json"),
                       ("history", "history.png"), ("predictions", result.predictions_path.name)):
        print(f"{name:<12} {result.run_dir / file}")
    return 0 if result.passed else 1


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEMO["out"], help="output folder (default %(default)s); data is reused")
    p.add_argument("--weights", default=DEMO["weights"],
                   help="backbone weights: none (default, offline), imagenet, or a weights file path")
    p.add_argument("--per-class", type=int, default=DEMO["per_class"],
                   help="synthetic images per subclass (default %(default)s)")
    p.add_argument("--image-size", type=int, default=DEMO["image_size"], help="model input size (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEMO["epochs"], help="head-training epochs (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEMO["seed"], help="default %(default)s")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Command:
    """One subcommand: what it does, how it adds its arguments, and what runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {
    "download": Command("download the Kaggle Multi Cancer dataset with kagglehub", add_download, run_download),
    "scan": Command("count images per organ, cancer label and subclass; optionally save a split manifest", add_scan,
                    run_scan),
    "audit-split": Command("count near-duplicate images that a split puts on both sides (train-test, ...)",
                           add_audit_split, run_audit_split),
    "demo-data": Command("write a small SYNTHETIC dataset in the Kaggle folder layout (smoke tests only)",
                         add_demo_data, run_demo_data),
    "train": Command("train the joint model (or one single-task model) and write a run directory", add_train,
                     run_train),
    "evaluate": Command("metrics, confusion matrices and a report of a run on its test split or another folder",
                        add_evaluate, run_evaluate),
    "predict": Command("predict organ and benign/malignant for image files, folders or globs with a finished run",
                       add_predict, run_predict),
    "export": Command("export a run as a TF SavedModel, ONNX (fp32) or int8 model, checked against Keras",
                      add_export, run_export),
    "serve": Command("serve a run over HTTP: a JSON API (/predict, /explain) and a page to drop images on",
                     add_serve, run_serve),
    "demo": Command("offline demo: synthetic data -> train the joint model -> evaluate -> predict (a few minutes)",
                    add_demo, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitask",
        description="One InceptionV3 backbone, two heads: organ and benign/malignant from one image.",
    )
    parser.add_argument("-v", "--verbose", dest="debug", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args) or 0
    except MultitaskError as exc:
        print(f"multitask {args.command}: error: {cli_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
