"""Stage prepare: decode, check and de-duplicate the image folder; pack each split at the target size.

DVC depends on data/inventory.json (the folder's fingerprint), not on the folder: DVC stops on a broken
link and hangs on a FIFO inside a folder dependency. `python stages/prepare.py --refresh` rewrites the
fingerprint from the folder as it is now (`sstl run` does it before `dvc repro`); the stage rewrites it
too, from the bytes it packed, so dvc.lock records the photos each run was made from.
"""

import sys
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl import tracking
from sstl.errors import SstlError, stage_main
from sstl.files import write_json
from sstl.params import load_params
from sstl.prepare import INVENTORY, fingerprint, prepare_folder, refresh_inventory, skip_report

PREPARED = Path("data/prepared")
METRICS = Path("reports/prepare.json")


@stage_main
def main() -> None:
    args = sys.argv[1:]
    if args not in ([], ["--refresh"]):
        raise SstlError(f"unknown arguments {' '.join(args)}: run `python stages/prepare.py [--refresh]`")
    p = load_params()
    folder = Path(p.data.folder)
    if args:
        changed = refresh_inventory(folder)
        print(f"{INVENTORY}: {'updated' if changed else 'unchanged'} (fingerprint of {folder})")
        return
    with tracking.stage_run(
        "prepare", p.mlflow.experiment, {"seed": p.seed, "data": p.data.model_dump(), "image_size": p.image_size()}
    ):
        summary = prepare_folder(
            folder,
            PREPARED,
            image_size=p.image_size(),
            val_fraction=p.data.val_fraction,
            seed=p.seed,
            neardup=p.data.neardup,
            corrupt_test=p.data.test_add_corruptions,
            interpolation=p.interpolation(),
        )
        tracking.log_metrics(summary.as_metrics())
        tracking.log_artifacts(PREPARED / "manifest.csv", PREPARED / "skipped.csv", PREPARED / "neardup.csv")
    write_json(METRICS, summary.as_metrics())
    write_json(INVENTORY, fingerprint(folder, summary.inventory))
    for line in skip_report(summary.skipped, PREPARED / "skipped.csv"):
        print(line)
    absent = [f"{s}: {src}" for s, src in summary.sources.items() if summary.counts[s] == 0]
    if absent:
        print(f"prepare: empty split {'; '.join(absent)}")
    print(f"prepare: {summary.as_metrics()}")


if __name__ == "__main__":
    main()
