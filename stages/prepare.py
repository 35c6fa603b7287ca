"""Stage prepare: decode, check and de-duplicate the image folder; pack each split at the target size.

DVC depends on data/inventory.json (the folder's fingerprint), not on the folder: DVC stops on a broken
link and hangs on a FIFO inside a folder dependency. `python stages/prepare.py --refresh` rewrites the
fingerprint from the folder as it is now (`sstl run` does it before `dvc repro`); the stage rewrites it
too, from the bytes it packed, so dvc.lock records the photos each run was made from.

`python stages/prepare.py --out data/prepared --report reports/prepare.json --inventory data/inventory.json`
"""

import argparse
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.core.files import write_json
from sstl.data.inventory import INVENTORY, fingerprint, refresh_inventory
from sstl.data.prepare import prepare_folder, skip_report
from sstl.params import load_params
from sstl.pipeline.stage import add_paths, parse_paths, stage_main
from sstl.track import tracking


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh", action="store_true", help=f"only rewrite {INVENTORY} from the folder")
    p = load_params()
    folder = Path(p.data.folder)
    if parser.parse_known_args()[0].refresh:
        changed = refresh_inventory(folder)
        print(f"{INVENTORY}: {'updated' if changed else 'unchanged'} (fingerprint of {folder})")
        return
    add_paths(parser, outputs=["out", "report", "inventory"])
    args = parse_paths(parser)
    with tracking.stage_run(
        "prepare", p.mlflow.experiment, {"seed": p.seed, "data": p.data.model_dump(), "image_size": p.image_size()}
    ):
        summary = prepare_folder(
            folder,
            args.out,
            image_size=p.image_size(),
            val_fraction=p.data.val_fraction,
            seed=p.seed,
            neardup=p.data.neardup,
            corrupt_test=p.data.test_add_corruptions,
            interpolation=p.interpolation(),
        )
        tracking.log_metrics(summary.as_metrics())
        tracking.log_artifacts(*(args.out / f for f in ("manifest.csv", "skipped.csv", "neardup.csv")))
    write_json(args.report, summary.as_metrics())
    write_json(args.inventory, fingerprint(folder, summary.inventory))
    for line in skip_report(summary.skipped, args.out / "skipped.csv"):
        print(line)
    absent = [f"{s}: {src}" for s, src in summary.sources.items() if summary.counts[s] == 0]
    if absent:
        print(f"prepare: empty split {'; '.join(absent)}")
    print(f"prepare: {summary.as_metrics()}")


if __name__ == "__main__":
    main()
