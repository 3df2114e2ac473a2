"""The ``multitask`` command: argparse only. The table of subcommands, the parser and ``main``.

The subcommands live in :mod:`multitask.cli_prepare` (making a run: download, scan, audit-split, demo-data, train)
and :mod:`multitask.cli_use` (using one: evaluate, predict, export, serve, demo); each parses, calls the library,
prints.

Every default and choice comes from the library (:mod:`multitask.settings` and the dataclasses there), so it is
written once. Library errors (:class:`multitask.errors.MultitaskError`) are printed as one line, with settings
named by their flags, and exit with status 2, as does a full disk (an OSError ENOSPC or EDQUOT, which names the
file being written); anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from multitask.cli_prepare import (
    add_audit_split,
    add_demo_data,
    add_download,
    add_scan,
    add_train,
    run_audit_split,
    run_demo_data,
    run_download,
    run_scan,
    run_train,
)
from multitask.cli_use import (
    add_demo,
    add_evaluate,
    add_export,
    add_predict,
    add_serve,
    run_demo,
    run_evaluate,
    run_export,
    run_predict,
    run_serve,
)
from multitask.errors import MultitaskError, cli_message
from multitask.files import DISK_FULL
from multitask.startup import quiet_tensorflow

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
    parser.add_argument("-v", "--verbose", dest="debug", action="store_true",
                        help="debug logging, and TensorFlow's own start-up messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_tensorflow()  # before anything imports TensorFlow
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command].run(args) or 0
    except MultitaskError as exc:
        print(f"multitask {args.command}: error: {cli_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        # The free-space checks passed, then the disk filled: writes are atomic, so nothing half-written is left.
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(f"multitask {args.command}: error: {exc.strerror or 'no space left on device'}{where}; nothing "
              "half-written was left: free some space (or write somewhere else) and run the command again",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
