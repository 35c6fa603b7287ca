"""Stages teacher, student@<round> and finetune: one body, three ways to build the network and its data.

    python stages/train.py teacher --data data/prepared --pretrain models/pretrain.pt
        --tuned reports/tune/best_params.json --model models/teacher.pt --curve reports/curves/teacher.csv
    python stages/train.py student --data data/prepared --pretrain models/pretrain.pt
        --labels data/pseudolabels/<TEACHER>.csv --probs data/pseudolabels/<TEACHER>.npy
        --model models/<STUDENT>.pt --curve reports/curves/<STUDENT>.csv --ood reports/ood/<STUDENT>.csv
    python stages/train.py finetune --data data/prepared --init models/<LAST STUDENT>.pt
        --model models/finetuned.pt --curve reports/curves/finetuned.csv

teacher: transfer learning on the labelled set with the tuned hyperparameters. student: a network on
labelled + pseudo-labelled images under strong augmentation (<STUDENT> names its round in params.yaml's
`rounds`; the consistency student's screen lists the pool photos it found of no known class in --ood).
finetune: the last round's student on the clean labelled set at a small learning rate.
Under torchrun (`torchrun --nproc_per_node N stages/train.py ...`) every process trains on its share
of each batch (DDP) and rank 0 writes the model and logs to MLflow.
"""

import argparse

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.params import load_params
from sstl.pipeline.stage import add_paths, parse_paths, stage_main
from sstl.pipeline.train import PLANS, run_training


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = top.add_subparsers(dest="role", required=True)
    add_paths(roles.add_parser("teacher"), inputs=["data", "pretrain", "tuned"], outputs=["model", "curve"])
    add_paths(
        roles.add_parser("student"), inputs=["data", "pretrain", "labels", "probs"], outputs=["model", "curve", "ood"]
    )
    add_paths(roles.add_parser("finetune"), inputs=["data", "init"], outputs=["model", "curve"])
    return top


@stage_main
def main() -> None:
    args = parse_paths(parser())
    result = run_training(PLANS[args.role], args, load_params())
    if result is not None:  # rank 0
        score = f"val_loss={result.best_val_loss:.4f} val_acc={result.best_val_acc:.4f}"
        print(f"{args.model.stem}: {score} -> {args.model}")


if __name__ == "__main__":
    main()
