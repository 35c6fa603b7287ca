"""Stage prepare: decode, check and de-duplicate the image folder; pack each split at the target size."""

from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl import tracking
from sstl.errors import stage_main
from sstl.files import write_json
from sstl.params import load_params
from sstl.prepare import prepare_folder

PREPARED = Path("data/prepared")
METRICS = Path("reports/prepare.json")


@stage_main
def main() -> None:
    p = load_params()
    with tracking.stage_run(
        "prepare", p.mlflow.experiment, {"seed": p.seed, "data": p.data.model_dump(), "image_size": p.image_size()}
    ):
        summary = prepare_folder(
            Path(p.data.folder),
            PREPARED,
            p.image_size(),
            p.data.val_fraction,
            p.seed,
            neardup=p.data.neardup,
            corrupt_test=p.data.test_add_corruptions,
            interpolation=p.interpolation(),
        )
        tracking.log_metrics(summary.as_metrics())
        tracking.log_artifacts(PREPARED / "manifest.csv", PREPARED / "skipped.csv", PREPARED / "neardup.csv")
    write_json(METRICS, summary.as_metrics())
    for row in summary.skipped:
        print(f"skipped {row['path']}: {row['reason']}")
    print(f"prepare: {summary.as_metrics()}; skipped files are listed in {PREPARED / 'skipped.csv'}")


if __name__ == "__main__":
    main()
