"""``multitask`` subcommands that make a run: download, scan, audit-split, demo-data and train (argparse only).

Each ``add_*`` adds a subcommand's arguments, with defaults from :mod:`multitask.settings`; each ``run_*`` calls the
library and prints. :mod:`multitask.cli` holds the table of subcommands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multitask.errors import MultitaskError, cli_message
from multitask.settings import (
    AUGMENTS,
    BALANCES,
    DEFAULT_SPLIT_METHOD,
    FINE_TUNE_LR_FACTOR,
    FINE_TUNE_SCHEDULES,
    PRECISIONS,
    PRETRAINED_FINE_TUNE_EPOCHS,
    SPLIT_METHODS,
    STRATEGIES,
    SWITCHES,
    TASK_CHOICES,
    WEIGHTINGS,
    GroupingParams,
    SyntheticSettings,
    TrainConfig,
    defaults,
)

TRAIN = defaults(TrainConfig)
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


def print_table(title: str, frame, *, missing: str | None = None) -> None:
    """``frame`` under ``title``; a missing value shows as "-", and ``missing`` (why) is said once when there is one."""
    print(f"\n{title}")
    print(with_dashes(frame).to_string())
    if missing and frame.isna().any(axis=None):
        print(f"-: {missing}")


def with_dashes(frame):
    """``frame`` with every missing value (NaN, None) as "-", for printing: NaN and None mean nothing to a reader."""
    return frame.astype(object).where(frame.notna(), "-")


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
    from multitask.guard import check_output
    from multitask.splits import save_split, split_manifest
    from multitask.taxonomy import load_taxonomy

    if args.out:  # now, not after a grouped split of the full set (~30 minutes); not in the data, nor a run's file
        check_output(args.out, flag="$out", data=[args.data])
    taxonomy = load_taxonomy(args.taxonomy)
    result = scan_tree(args.data, taxonomy=taxonomy, verify=args.verify, allow_unknown=args.allow_unknown)
    manifest, report = result.manifest, result.report
    print_table("images per organ x cancer", counts_table(manifest))
    per_sub = manifest.groupby(["subclass", "organ", "cancer"]).size().rename("images").reset_index()
    print_table("images per subclass", per_sub.set_index("subclass"))
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
    elif args.verify:
        print(f"--verify: all {len(manifest)} files decode")
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
    from multitask.guard import check_output, data_roots

    frame = read_split_table(args.split_csv)
    csv = Path(args.split_csv).resolve()
    out = Path(args.out) if args.out else csv.parent / f"{csv.stem}_audit"  # one folder per CSV: no overwriting
    check_output(out, flag="$out", folder=True, data=data_roots(frame["path"]))  # before the work
    by = "subclass" if "subclass" in frame.columns else "the whole set (no subclass column)"
    print(f"checking {len(frame)} images of {args.split_csv}; candidates within {by}, k={args.k}, "
          f"min inliers {args.min_inliers}")
    audit = audit_split(frame, params=GroupingParams(k=args.k, min_inliers=args.min_inliers), cache_dir=args.cache_dir,
                        workers=args.workers)
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
        print_table("worst pairs (most inliers)", worst)
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
    if info is None:  # a multi-worker run's other workers keep nothing (multitask.distribute)
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
              f"epoch {saved['epoch'] if saved['epoch'] is not None else '?'})")
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
                   help="then epochs of end-to-end fine-tuning on augmented images (default: "
                        f"{PRETRAINED_FINE_TUNE_EPOCHS} with pretrained weights, 0 with --weights none)")
    p.add_argument("--unfreeze-from", default=d.unfreeze_from,
                   help="first backbone layer to fine-tune; BatchNorm stays frozen (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="default %(default)s")
    p.add_argument("--fine-tune-learning-rate", type=float, default=d.fine_tune_learning_rate,
                   help=f"default: {FINE_TUNE_LR_FACTOR:g} x --learning-rate")
    p.add_argument("--fine-tune-schedule", choices=FINE_TUNE_SCHEDULES, default=d.fine_tune_schedule,
                   help="fine-tuning's learning rate over the phase: constant, or cosine: decayed to 0 by its last "
                        "step (default %(default)s)")
    p.add_argument("--loss-weights", type=_loss_weights, default=d.loss_weights,
                   help="static weight of each head's loss, e.g. organ=1.0,cancer=0.5 (default 1 each)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=d.weighting,
                   help="static: --loss-weights; uncertainty: learned (Kendall et al. 2018) (default %(default)s)")
    p.add_argument("--balance", nargs="?", choices=BALANCES, const="classes", default=d.balance,
                   help="weight training images: classes (also a bare --balance): each head's classes count equally; "
                        "organs: every image by the inverse of its organ's share, in both heads' losses, so a small "
                        "organ counts as much as a large one for the cancer head too (default %(default)s)")
    p.add_argument("--augment", choices=AUGMENTS, default=d.augment,
                   help="fine-tuning's augmentation: none; standard: flips, rotation up to ~11 degrees, 10%% "
                        "brightness/contrast; strong: up to 18 degrees and 20%% (default %(default)s)")
    p.add_argument("--split-file", help="reuse this saved split (from `multitask scan --out`) instead of --data")
    add_split_options(p, seed_help="random seed of the split, the initialisation and the data order")
    add_taxonomy_options(p)
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="tf.distribute: mirrored = all local GPUs (or CPUs), multiworker = TF_CONFIG cluster")
    p.add_argument("--cache-dir", help="where backbone features and decoded images are cached (default RUN_DIR/cache)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: mixed_bfloat16 on GPUs that have it (NVIDIA Ampere or later), float32 elsewhere; "
                        "mixed_float16 adds loss scaling. The saved model computes in float32 (default %(default)s)")
    p.add_argument("--jit-compile", choices=SWITCHES, default=d.jit_compile,
                   help="compile the training step with XLA; auto: on where a GPU is present (default %(default)s)")
    p.add_argument("--decoded-cache", choices=SWITCHES, default=d.decoded_cache,
                   help="decode and resize every image once into a uint8 array file in --cache-dir that feature "
                        "extraction and every fine-tuning epoch read; auto: when it takes at most half the free disk "
                        "space (about 268 KB per image at 299 px) (default %(default)s)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stopping: epochs without a better validation loss (default %(default)s)")
    p.add_argument("--target-sensitivity", type=float, default=d.target_sensitivity,
                   help="the malignancy threshold is chosen on the validation split as the highest one whose "
                        "sensitivity (Malignant recall) reaches this (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of ours in --out (only the files it owns; other files stay)")


