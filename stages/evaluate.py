"""Stage evaluate: the frozen-feature probes (the baseline), teacher, every round's student and the
fine-tuned student on test and test-add, and on val for the health checks (collapse, a model below its
predecessor, a model to use not above the baseline) and the choice of the model to use (never a probe),
which is published to the MLflow registry (`mlflow.model_name`, sstl.track.registry).

`evaluate.tta` averages each model's logits over flipped (and shifted) views (sstl.models.inference).

    python stages/evaluate.py --data data/prepared --models models --metrics reports/metrics.json
        --per-class reports/per_class.json --health reports/health.json --confusion reports/confusion
        --summary reports/summary.md --card reports/model_card.md
"""

import argparse
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's src/ first: see stages/_checkout.py)

from sstl.core.environment import describe
from sstl.core.files import write_csv, write_json, write_text
from sstl.data.dataset import load_classes, load_split
from sstl.eval import health
from sstl.eval.model_card import gather_data, gather_params, model_card
from sstl.eval.report import summary_markdown
from sstl.models.checkpoint import load_checkpoint
from sstl.params import Params, load_params
from sstl.pipeline.evaluate import evaluate_model
from sstl.pipeline.stage import add_paths, parse_paths, stage_main
from sstl.track import registry, tracking

SPLITS = ("val", "test", "test-add")  # val: checks and choice only, never in the metrics


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paths(
        parser,
        inputs=["data", "models"],
        outputs=["metrics", "per-class", "health", "confusion", "summary", "card"],
    )
    args = parse_paths(parser)
    p = load_params()
    models = {name: args.models / f"{name}.pt" for name in ("teacher", *p.students(), "finetuned")}  # pipeline order
    probes = {path.stem: path for path in sorted((args.models / "probes").glob("*.pt"))}  # the baseline to beat
    runtime = p.runtime("infer")
    classes = load_classes(args.data)
    data = {split: load_split(args.data, split) for split in SPLITS}
    absent = [s for s, d in data.items() if len(d) == 0 and s != "val"]  # e.g. a folder without test-add/
    metrics, per_class, val_acc, collapses, confusion, reliability, checkpoints = {}, {}, {}, {}, {}, {}, {}
    probe_val, baseline, val_correct = {}, {}, {}
    with tracking.stage_run(
        "evaluate", p.mlflow.experiment, {**runtime.describe(), "evaluate": p.evaluate.model_dump()}
    ):
        for name, path in {**probes, **models}.items():
            model, payload = load_checkpoint(path, runtime.device)
            if name in probes:
                baseline[name] = {
                    "arch": payload["model"]["arch"],
                    "weights": payload["model"]["weights"],
                    **{k: payload["probe"][k] for k in ("C", "folds", "rows", "splits")},
                }
            else:
                checkpoints[name] = {k: v for k, v in payload.items() if k != "state_dict"}
            for split, d in data.items():
                if len(d) == 0:
                    continue
                r = evaluate_model(
                    model, d, num_classes=len(classes), bins=p.evaluate.ece_bins, runtime=runtime, tta=p.evaluate.tta
                )
                if split == "val" and name in probes:
                    probe_val[name] = baseline[name]["val_accuracy"] = round(r["accuracy"], 4)
                    continue
                if split == "val":
                    val_acc[name] = round(r["accuracy"], 4)
                    val_correct[name] = [q == t for q, t in zip(r["predictions"], d.labels.tolist(), strict=True)]
                    collapses[name] = health.collapse(r["predictions"], d.labels, classes)
                    continue
                metrics.setdefault(name, {})[split] = {k: round(r[k], 4) for k in ("accuracy", "macro_f1", "ece")}
                per_class.setdefault(name, {})[split] = dict(zip(classes, r["per_class_accuracy"], strict=True))
                rows = [
                    {"actual": classes[t], "predicted": classes[q]}
                    for t, q in zip(d.labels.tolist(), r["predictions"], strict=True)
                ]
                write_csv(args.confusion / f"{name}-{split}.csv", rows)
                confusion.setdefault(name, {})[split] = rows
                reliability.setdefault(name, {})[split] = r["reliability"]
        if p.data.refit:  # val is in the students' training rows: it cannot judge them
            use, rule = list(models)[-1], health.REFIT_RULE
        else:  # the one model to use: summary, card, registry
            use, rule = health.recommend(val_correct, order=list(models)), health.RULE
        accuracy = {m: {s: r["accuracy"] for s, r in per_split.items()} for m, per_split in metrics.items()}
        for m, a in {**val_acc, **probe_val}.items():
            accuracy.setdefault(m, {})["val"] = a
        warnings = health.check_models(val_acc, collapses, order=list(models))
        held_out = [s for s in SPLITS if s != "val"] if p.data.refit else SPLITS
        warnings += health.below_baseline(accuracy, use, list(probes), splits=held_out)
        verdict = {
            "val_accuracy": val_acc,
            "use": use,
            "rule": rule,
            "baseline": baseline,
            "warnings": warnings,
            "absent_splits": absent,
        }
        write_json(args.metrics, metrics)
        write_json(args.per_class, per_class)
        write_json(args.health, verdict)
        write_text(args.summary, summary_markdown(metrics, verdict))
        card = model_card(
            metrics=metrics,
            per_class=per_class,
            confusion=confusion,
            reliability=reliability,
            verdict=verdict,
            data=data_section(p, args.data),
            params=gather_params(checkpoints, p.model_dump()),
            environment=describe(),
        )
        write_text(args.card, card)
        tracking.log_metrics(metrics | {"val_accuracy": val_acc | probe_val})
        tracking.set_tags({"sstl.use": verdict["use"], "sstl.warnings": "; ".join(warnings) or "none"})
        tracking.log_artifacts(args.metrics, args.per_class, args.health, args.summary, args.confusion, args.card)
        if p.mlflow.model_name and "test" in metrics[use]:
            decision = registry.publish(
                models[use],
                name=p.mlflow.model_name,
                metrics=metrics[use],
                tta=p.evaluate.tta,
                example=data["test"].images[0].numpy(),
                data=registry.data_digest(*[(d.images, d.labels) for s, d in data.items() if s != "val"]),
            )
            outcome = f"{decision['champion']} champion ({decision['champion_reason']})"
            print(f"registered {p.mlflow.model_name} ({use}): {outcome}")
    health.warn("evaluate", warnings)
    print(args.summary.read_text())


def data_section(p: Params, prepared: Path) -> dict:
    corruptions = p.data.test_add_corruptions
    return gather_data(
        prepared,
        folder=p.data.folder,
        test_add_corruptions=None if corruptions is None else corruptions.model_dump(),
    )


if __name__ == "__main__":
    main()
