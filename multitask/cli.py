"""The ``multitask`` command: argparse only. Each subcommand parses, calls the library, prints.

Library errors (:class:`multitask.errors.MultitaskError`) are printed as one line and exit with status 2;
anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from multitask.errors import MultitaskError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(name: str, help: str):
    """Register ``fn(args)`` as subcommand ``name``; its docstring-free sibling ``add_<name>`` adds arguments."""

    def register(fn):
        COMMANDS[name] = fn
        fn.help = help
        return fn

    return register


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


@command("download", "download the Kaggle Multi Cancer dataset with kagglehub")
def run_download(args: argparse.Namespace) -> int:
    from multitask.data import download

    path = download(args.dest)
    print(f"downloaded to {path}\nnext: multitask scan {path!s} --out split.csv")
    return 0


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", help="folder to download into (default: kagglehub's cache)")


@command("scan", "count images per organ, cancer label and subclass; optionally save a split manifest")
def run_scan(args: argparse.Namespace) -> int:
    from multitask.data import counts_table, save_split, scan_tree, split_manifest
    from multitask.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(args.taxonomy)
    result = scan_tree(args.data, taxonomy=taxonomy, verify=args.verify, allow_unknown=args.allow_unknown)
    manifest, report = result.manifest, result.report
    _print_table("images per organ x cancer", counts_table(manifest))
    per_sub = manifest.groupby(["subclass", "organ", "cancer"]).size().rename("images").reset_index()
    _print_table("images per subclass", per_sub.set_index("subclass"))
    print(f"\n{len(manifest)} images in {manifest['subclass'].nunique()} subclasses under {report.root}")
    if report.ignored_files:
        print(f"ignored {report.ignored_files} non-image file(s)")
    if report.unknown_folders:
        print(f"skipped {len(report.unknown_folders)} folder(s) not in the taxonomy")
    if report.missing_subclasses:
        print(f"not found: {', '.join(report.missing_subclasses)}")
    if report.unreadable:
        print(f"dropped {len(report.unreadable)} unreadable file(s):")
        for path, reason in report.unreadable.items():
            print(f"  {path}: {reason}")
    if args.out:
        split = split_manifest(manifest, fractions=args.fractions, seed=args.seed, method=args.split)
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


def add_taxonomy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--taxonomy", help="CSV mapping subclass -> type_folder, organ, cancer, note")
    p.add_argument("--allow-unknown", action="store_true",
                   help="skip image folders that are not in the taxonomy instead of stopping")


def add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fractions", type=_fractions, default=(0.70, 0.15, 0.15),
                   help="train,val,test fractions (default 0.7,0.15,0.15)")
    p.add_argument("--seed", type=int, default=42, help="random seed of the split (default 42)")
    p.add_argument("--split", choices=("random", "grouped"), default="random",
                   help="random: stratified by subclass; grouped: also keeps near-duplicate siblings together")


@command("demo-data", "write a small SYNTHETIC dataset in the Kaggle folder layout (smoke tests only)")
def run_demo_data(args: argparse.Namespace) -> int:
    from multitask.synthetic import DEMO_ROOT, generate

    out = generate(args.out, per_class=args.per_class, size=args.size, seed=args.seed,
                   with_bad_files=args.with_bad_files)
    print(f"wrote synthetic data to {out / DEMO_ROOT}\nnext: multitask scan {out}")
    return 0


def add_demo_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write into")
    p.add_argument("--per-class", type=int, default=40, help="images per subclass (default 40)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-bad-files", action="store_true",
                   help="also write an empty, a truncated, a text and a PNG-named-.jpg file")


# ----------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multitask",
        description="One InceptionV3 backbone, two heads: organ and benign/malignant from one image.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.help, description=fn.help)
        globals()[f"add_{name.replace('-', '_')}"](p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except MultitaskError as exc:
        print(f"multitask {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
