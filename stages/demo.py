"""Stage demo: write scikit-learn's digits as an image folder (labeled/, unlabeled/, test/, test-add/).

`python stages/demo.py --out data/demo`
"""

import argparse

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.data.demo import write_demo
from sstl.params import load_params
from sstl.pipeline.stage import add_paths, parse_paths, stage_main


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_paths(parser, outputs=["out"])
    out = parse_paths(parser).out
    p = load_params()
    counts = write_demo(out, p.demo.labels_per_class, p.demo.test_fraction, p.demo.test_add_fraction, p.seed)
    print(f"demo: wrote {counts} to {out}/")


if __name__ == "__main__":
    main()
