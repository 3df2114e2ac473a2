"""How far each export strays from Keras, under the kernel set this process was started with.

    python scripts/numerics_spread.py RUN [RUN ...] --out artifacts/numerics.json
    ONEDNN_MAX_CPU_ISA=AVX2 python scripts/numerics_spread.py RUN ...          # TensorFlow's oneDNN limited to AVX2
    MULTITASK_LITERT_KERNELS=reference python scripts/numerics_spread.py RUN  # LiteRT's reference int8 kernels

For every run and format (tf_saved_model, onnx, int8) it exports into a scratch folder with the self-check's bars
lifted, so the numbers come back whatever they are, and records the self-check's max |probability difference| and
argmax agreement per head (and ood_score's for the fp32 formats) on the run's own 32 check images. The bars in
``multitask.export.TOLERANCE`` and the tests were set from these numbers, taken under every kernel set, with a
margin. Prints one line per run and format and writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from multitask import export  # noqa: E402
from multitask.rundir import open_run  # noqa: E402


def measure(run: Path, format: str, scratch: Path) -> dict:
    """The self-check's numbers of ``format`` for ``run``, with its bars lifted."""
    lifted = {"max_abs_diff": 1e9, "argmax_agreement": 0.0, "ood_score_max_abs_diff": 1e9}  # export.json is strict JSON
    saved = dict(export.TOLERANCE[format])
    export.TOLERANCE[format] = lifted
    try:
        result = export.export_run(run, format=format, out=scratch / f"{run.name}-{format}")
    finally:
        export.TOLERANCE[format] = saved
    return {"run": str(run), "image_size": open_run(run).image_size, "format": format,
            "max_abs_diff": result.max_abs_diff, "argmax_agreement": result.argmax_agreement, "images": result.images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--formats", default=",".join(export.FORMATS))
    parser.add_argument("--out", type=Path, default=Path("artifacts/numerics.json"))
    args = parser.parse_args()
    kernels = {"ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA", "(all)"),
               "MULTITASK_LITERT_KERNELS": os.environ.get("MULTITASK_LITERT_KERNELS", "xnnpack")}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            for format in args.formats.split(","):
                row = {**measure(run, format, Path(scratch)), **kernels}
                rows.append(row)
                diffs = ", ".join(f"{k} {v:.3g}" for k, v in row["max_abs_diff"].items())
                agree = ", ".join(f"{k} {v:.3f}" for k, v in row["argmax_agreement"].items())
                print(f"{run.name} {row['image_size']} px {format}: max |diff| {diffs}; agreement {agree}; {kernels}",
                      flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
