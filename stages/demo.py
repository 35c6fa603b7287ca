"""Stage demo: write scikit-learn's digits as an image folder (labeled/, unlabeled/, test/, test-add/)."""

from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.demo import write_demo
from sstl.errors import stage_main
from sstl.params import load_params

OUT = Path("data/demo")


@stage_main
def main() -> None:
    p = load_params()
    counts = write_demo(OUT, p.demo.labels_per_class, p.demo.test_fraction, p.demo.test_add_fraction, p.seed)
    print(f"demo: wrote {counts} to {OUT}/")


if __name__ == "__main__":
    main()
