"""``multitask`` subcommands that use a finished run: evaluate, predict (and --merge), export, serve, and the demo.

Each ``add_*`` adds a subcommand's arguments, with defaults from :mod:`multitask.settings`; each ``run_*`` calls the
library and prints. :mod:`multitask.cli` holds the table of subcommands.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from multitask import settings
from multitask.cli_prepare import print_table, with_dashes

DEMO = settings.defaults(settings.DemoConfig)


# ----------------------------------------------------------------------------------------------- evaluate / predict


def run_evaluate(args: argparse.Namespace) -> int:
    from multitask.evaluate import METRICS_FILE, MODEL_CARD_FILE, REPORT_FILE, evaluate_run, summary_table
    from multitask.report import below_target_note, organ_thresholds_note, overlap_note

    metrics = evaluate_run(args.run_dir, data=args.data, split=args.split, out=args.out,
                           batch_size=args.batch_size, explain=args.explain, calibrated=not args.uncalibrated,
                           threshold=args.threshold, tta=args.tta)
    source = metrics["source"]
    print(f"evaluated {metrics['n_images']} images ({source.get('split', 'folder')}: {source['path']})"
          + (TTA_NOTE if metrics["tta"] else ""))
    print_table("metrics", summary_table(metrics), missing=MISSING_METRIC)
    for task in metrics["tasks"]:
        for note in metrics[task].get("notes", []):
            print(f"note ({task}): {note}")
    if "cancer" in metrics:
        cancer = metrics["cancer"]
        print(f"cancer: Malignant when P(Malignant) >= {cancer['threshold']:.3f} ({cancer['threshold_source']})")
        thresholds, weak = organ_thresholds_note(cancer), below_target_note(cancer)
        if thresholds:
            print(thresholds)
        if weak:
            print(f"warning: {weak}")
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
    p.add_argument("--split", choices=settings.SPLITS, default="test",
                   help="which split of the run's split.csv to evaluate (default %(default)s)")
    p.add_argument("--out", help="folder for metrics.json, report.md and figures (default: the run directory)")
    p.add_argument("--batch-size", type=int, default=settings.BATCH_SIZE, help="default %(default)s")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="add a figure of N evaluated images with each head's Grad-CAM heatmap to the report")
    add_operating_point_options(p)


SAMPLE_COLUMNS = ("true_organ", "organ", "organ_prob", "true_cancer", "cancer", "malignant_prob",
                  "malignancy_threshold", "ood", "error")
MISSING_PREDICTION = "no value: the file could not be read (see error), or its answer was withheld (see note)"
MISSING_METRIC = ("not defined for this head: ROC-AUC, sensitivity and specificity belong to the two-class cancer "
                  "head")
PREDICT_ROWS_SHOWN = 50


def run_predict(args: argparse.Namespace) -> int:
    from multitask.guard import check_output
    from multitask.predict import Predictor, collect_images, sample_predictions, write_predictions
    from multitask.rundir import open_run
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
    data = open_run(args.run_dir).data_roots()  # outputs go neither into the data nor among a run's files
    if args.out:
        check_output(args.out, flag="$out", data=data)
    if args.explain:
        check_output(args.explain, flag="$explain", folder=True, data=data)
    predictor = Predictor.from_run(args.run_dir, engine=args.engine, calibrated=not args.uncalibrated,
                                   threshold=args.threshold, tta=args.tta)
    if args.sample is not None:
        frame = sample_predictions(args.run_dir, args.sample, split=args.split, seed=args.seed,
                                   batch_size=args.batch_size, predictor=predictor)
        table = frame.set_index(frame["path"].map(os.path.basename).rename("file"))
        print_table(f"{len(frame)} random {args.split} images: true vs predicted",
                     table[[c for c in SAMPLE_COLUMNS if c in table.columns]].round(3).dropna(axis=1, how="all"),
                     missing=MISSING_PREDICTION)
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
            print_flat_maps(frame, predictor.tasks)
        per_row = bool(predictor.organ_thresholds)  # the threshold differs by predicted organ: say which per row
        hidden = [c for c in frame.columns if c.startswith(("p_", "explain_"))
                  or (c == "threshold_source" and not per_row)]  # P(Malignant) is read against the threshold
        shown = frame.drop(columns=[*hidden, "cancer_prob"], errors="ignore").round(3)
        if not args.out:
            print(with_dashes(shown.head(PREDICT_ROWS_SHOWN)).to_string(index=False))
            if shown.head(PREDICT_ROWS_SHOWN).isna().any(axis=None):
                print(f"-: {MISSING_PREDICTION}")
            if len(frame) > PREDICT_ROWS_SHOWN:
                print(f"... {len(frame) - PREDICT_ROWS_SHOWN} more rows; pass --out FILE.csv to save them all")
    failed = int(frame["error"].notna().sum())
    flagged = int(frame["ood"].sum()) if "ood" in frame.columns else 0
    print(f"\npredicted {len(frame) - failed} of {len(frame)} file(s)" + (f"; {failed} unreadable" if failed else "")
          + (f"; {flagged} unlike the training images (ood)" if flagged else "") + (TTA_NOTE if predictor.tta else ""))
    if "cancer" in predictor.tasks:
        print(f"Malignant when P(Malignant) >= {predictor.threshold:.3f}"
              + (" (--threshold)" if args.threshold is not None else " (the run's operating point)"))
        if predictor.organ_thresholds:
            print("  except where the predicted organ has its own threshold (column threshold_source = organ): "
                  + ", ".join(f"{organ} {t:.3f}" for organ, t in predictor.organ_thresholds.items()))
    if args.out:
        print(f"wrote {write_predictions(frame, args.out)}")
    return 0


def print_flat_maps(frame, tasks) -> None:
    """One line when some Grad-CAM overlays are flat maps (all dark: they show no location)."""
    from multitask.explain import FLAT_NOTE

    flat = {task: int(frame[f"explain_{task}_flat"].fillna(False).astype(bool).sum()) for task in tasks
            if f"explain_{task}_flat" in frame.columns}
    if any(flat.values()):
        counts = ", ".join(f"{n} {task}" for task, n in flat.items() if n)
        print(f"{counts} overlay(s) are flat (column explain_<head>_flat, titled 'flat map'): {FLAT_NOTE}")


def run_merge(args: argparse.Namespace) -> int:
    from multitask.guard import check_output
    from multitask.predict import write_predictions
    from multitask.shards import merge_parts

    if args.run_dir is not None or args.paths or args.sample is not None or args.shard or not args.out:
        print("multitask predict: error: --merge takes only the PART files and --out FILE", file=sys.stderr)
        return 2
    check_output(args.out, flag="$out")
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
    p.add_argument("--batch-size", type=int, default=settings.BATCH_SIZE, help="default %(default)s")
    p.add_argument("--sample", type=int, metavar="N",
                   help="instead of PATHs: N random images of the run's own split, true vs predicted")
    p.add_argument("--split", choices=settings.SPLITS, default="test",
                   help="split that --sample draws from (default %(default)s; train is refused)")
    p.add_argument("--seed", type=int, help="random seed of --sample (default: a new sample each time)")
    p.add_argument("--explain", metavar="DIR",
                   help="also write a Grad-CAM overlay PNG per image and head into DIR (adds explain_* columns)")
    p.add_argument("--engine", choices=settings.ENGINES, default=settings.ENGINES[0],
                   help="runtime of the forward pass: keras (default), onnx (fp32) or int8, from RUN/export/, "
                        "exported first when missing or stale; the columns are the same")
    p.add_argument("--reject-ood", action="store_true",
                   help="give no organ/cancer answer for images unlike the training images (ood), with a note")
    add_operating_point_options(p)


TTA_NOTE = " with flip TTA (each image averaged with its horizontal mirror; column tta)"


def add_operating_point_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uncalibrated", action="store_true",
                   help="show the raw softmax probabilities instead of the calibrated ones (keras engine)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="call an image Malignant when P(Malignant) >= P (default: the run's operating point, "
                        "chosen on validation for its target sensitivity; 0.5 with --uncalibrated)")
    p.add_argument("--tta", action="store_true",
                   help="flip test-time augmentation: average each image's probabilities with its horizontal "
                        "mirror's (twice the inference time; the OOD score stays the original image's)")


def run_export(args: argparse.Namespace) -> int:
    from multitask.export import LABELS_FILE, export_run

    result = export_run(args.run_dir, format=args.format, out=args.out,
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
    p.add_argument("--format", choices=settings.EXPORT_FORMATS, required=True,
                   help="tf_saved_model (TF Serving), onnx (fp32: ONNX Runtime, OpenVINO...) or int8 (LiteRT "
                        "dynamic-range)")
    p.add_argument("--out", help="folder to write (default RUN/export/FORMAT/)")
    p.add_argument("--check-images", type=int, default=settings.EXPORT_CHECK_IMAGES, metavar="N",
                   help="check the export on N of the run's test/val images (default %(default)s)")


def run_serve(args: argparse.Namespace) -> int:
    from multitask.errors import ConfigError
    from multitask.extras import require_extra

    require_extra("serve")  # before anything loads: the model, or an onnx export made first

    from multitask.serve.guard import check_listen, trusted_hosts

    token = args.token or os.environ.get("MULTITASK_SERVE_TOKEN") or None
    check_listen(args.host, args.port, token=token, insecure_no_token=args.insecure_no_token)  # before any loading
    try:
        import uvicorn

        from multitask.serve.app import create_app
    except ImportError as exc:
        raise ConfigError(f"multitask serve needs FastAPI and uvicorn ({exc.name} is missing): "
                          "pip install 'multitask[serve]'") from None
    hosts = trusted_hosts(args.host, args.allowed_host)
    app = create_app(args.run_dir, engine=args.engine, allowed_hosts=hosts, token=token)  # loads once, here
    print(f"serving {args.run_dir} ({args.engine} engine) on http://{args.host}:{args.port}/  (Ctrl+C stops)")
    print(f"answering Host names: {', '.join(hosts)}" + ("; every request but the page needs the bearer token "
                                                          "(the page asks for it once)" if token else ""))
    if token is None and args.insecure_no_token:
        print(f"WARNING: --insecure-no-token: anyone who can reach {args.host}:{args.port} can send images and read "
              "the answers", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory (from `multitask train`)")
    p.add_argument("--host", default=settings.SERVE_HOST,
                   help="address to listen on (default %(default)s: this machine only; any other address needs "
                        "--token or --insecure-no-token)")
    p.add_argument("--port", type=int, default=settings.SERVE_PORT, help="1..65535 (default %(default)s)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every request but the page (at least "
                                   "16 characters; or set MULTITASK_SERVE_TOKEN, which keeps it out of `ps`)")
    p.add_argument("--insecure-no-token", action="store_true",
                   help="serve a non-loopback --host without a token (anyone who reaches it can use it)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (e.g. the name of a proxy in front; "
                        "repeatable; * allows any). Others get 400, which stops DNS rebinding")
    p.add_argument("--engine", choices=settings.ENGINES[:2], default=settings.ENGINES[0],
                   help="runtime of the forward pass: keras (default) or onnx (fp32, from RUN/export/onnx/, "
                        "exported first when missing or stale)")


# ----------------------------------------------------------------------------------------------- demo


def run_demo(args: argparse.Namespace) -> int:
    from multitask.demo import PASS_ACCURACY, run_demo
    from multitask.evaluate import summary_table

    config = settings.DemoConfig(**{name: getattr(args, name) for name in DEMO if hasattr(args, name)},
                        verbose=0 if args.quiet else 1)
    result = run_demo(config)
    preview = result.predictions.assign(path=result.predictions["path"].map(os.path.basename))
    columns = [c for c in ("path", "true_organ", "organ", "organ_prob", "true_cancer", "cancer", "malignant_prob",
                           "malignancy_threshold") if c in preview.columns]
    print_table("predictions for a few test images", preview[columns].round(3).set_index("path"))
    print_table(f"test split metrics ({result.metrics['n_images']} images; the data is SYNTHETIC)",
                 summary_table(result.metrics), missing=MISSING_METRIC)
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


