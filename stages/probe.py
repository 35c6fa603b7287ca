"""Stage probe: the baseline to beat. Each distinct backbone of teacher and student (arch and weights),
frozen, under a scikit-learn logistic regression fitted on exactly the teacher's labelled rows, C chosen
by stratified k-fold cross-validation on those rows (params `probe`, sstl.eval.probe). evaluate scores
the probes beside the pipeline's models and warns when the model to use is not above them.

    python stages/probe.py --data data/prepared --pretrain models/pretrain.pt --out models/probes
        --report reports/probe.json
"""

import argparse

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.params import load_params
from sstl.pipeline.probe import run_probes
from sstl.pipeline.stage import add_paths, parse_paths, stage_main


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paths(parser, inputs=["data", "pretrain"], outputs=["out", "report"])
    report = run_probes(load_params(), parse_paths(parser))
    for name, r in report["probes"].items():
        best = max(r["cv_accuracy"].values(), default=float("nan"))
        print(f"{name}: frozen {r['arch']} ({r['weights']}), C={r['C']:g} (cv accuracy {best:.4f}, {r['rows']} rows)")
    if not report["enabled"]:
        print("probe: disabled (probe.enabled=false)")


if __name__ == "__main__":
    main()
