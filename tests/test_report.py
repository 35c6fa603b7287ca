"""`sstl report --rev` and `sstl exp show` on a tiny real git + DVC repo: two commits of metrics, params and
curves, no training. The stage `evaluate` only copies the metrics of the current `teacher.lr` from
results.json, so `dvc exp run` makes a real experiment in a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from typer.testing import CliRunner

from sstl.cli.app import app
from sstl.review.diff import stale_stages
from sstl.review.layout import SPLITS

MODELS = ("teacher", "student", "finetuned")  # one round: the pipeline's order

BIN = Path(sys.executable).parent
OLD_LR, NEW_LR, EXP_LR = 0.001, 0.003, 0.01


def _metrics(base: float) -> dict:
    """Distinct, known values per model and split: base + model offset + split offset."""
    return {
        m: {
            s: {"accuracy": round(base + 0.1 * i + 0.01 * j, 4), "macro_f1": round(base - 0.02 * i, 4), "ece": 0.05}
            for j, s in enumerate(SPLITS)
        }
        for i, m in enumerate(MODELS)
    }


RESULTS = {str(OLD_LR): _metrics(0.5), str(NEW_LR): _metrics(0.6), str(EXP_LR): _metrics(0.65)}
EVALUATE = """import json, yaml
lr = yaml.safe_load(open("params.yaml"))["teacher"]["lr"]
json.dump(json.load(open("results.json"))[str(lr)], open("reports/metrics.json", "w"), indent=2)
"""


def sh(cwd: Path, *cmd: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert not check or res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def dvc(cwd: Path, *args: str) -> str:
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return sh(cwd, sys.executable, "-m", "dvc", *args, env=env).stdout


def _write(repo: Path, rel: str, text: str) -> None:
    (repo / rel).parent.mkdir(parents=True, exist_ok=True)
    (repo / rel).write_text(text)


def _curves(repo: Path, shift: float) -> None:
    """Per-epoch curves, tune convergence, pseudo-label counts and a confusion file, as the stages write them."""
    for i, model in enumerate(MODELS):
        rows = [f"{e},{1.0 / e + shift + i:.4f},{0.5 + 0.1 * e - shift:.4f}" for e in range(1, 5)]
        _write(repo, f"reports/curves/{model}.csv", "epoch,val_loss,val_acc\n" + "\n".join(rows) + "\n")
    conv = [f"{t},{1.0 / (t + 1) + shift:.4f},{1.0 / (t + 1) + shift:.4f}" for t in range(5)]
    _write(repo, "reports/tune/convergence.csv", "trial,val_loss,best_so_far\n" + "\n".join(conv) + "\n")
    counts = [f"{c},{10 + int(shift * 100) * k}" for k, c in enumerate(("one", "two", "zero"))]
    _write(repo, "reports/pseudolabel/teacher/counts.csv", "class,count\n" + "\n".join(counts) + "\n")
    pairs = ["one,one", "one,two", "two,two", "zero,zero"] + (["two,zero"] if shift else [])
    for name in ("teacher-test", "finetuned-test"):
        _write(repo, f"reports/confusion/{name}.csv", "actual,predicted\n" + "\n".join(pairs) + "\n")


def _set_params(repo: Path, **changes: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        section, leaf = key.split("__")
        params[section][leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def build_repo(repo: Path) -> Path:
    """Two commits: the base (teacher.lr 0.001) and the branch (teacher.lr 0.003, student.dropout 0.3)."""
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]  # the project's own plot definitions
    stage = {
        "cmd": "python evaluate.py",
        "deps": ["evaluate.py", "results.json"],
        "params": ["teacher", "student", "pseudolabel"],
        "metrics": [{"reports/metrics.json": {"cache": False}}],
    }
    _write(repo, "dvc.yaml", yaml.safe_dump({"stages": {"evaluate": stage}, "plots": plots}, sort_keys=False))
    _write(repo, "params.yaml", (ROOT / "params.yaml").read_text())  # valid: `sstl status` checks it
    _set_params(repo, teacher__lr=OLD_LR)
    _write(repo, "evaluate.py", EVALUATE)
    _write(repo, "results.json", json.dumps(RESULTS))
    _write(repo, ".gitignore", "/data/\n/review-plots/\n/report.md\n")
    _curves(repo, 0.0)
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "config", "user.email", "ci@example.com")
    sh(repo, "git", "config", "user.name", "ci")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "base")
    _set_params(repo, teacher__lr=NEW_LR, student__dropout=0.3)
    _curves(repo, 0.2)
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "branch")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repo(tmp_path_factory.mktemp("review"))


def outside_venv_env() -> dict[str, str]:
    """PATH without this venv's bin/ (no `dvc`, no `sstl`): what a shell that never activated it has."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return env | {"PATH": path}


def sstl(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The installed `sstl` entry point, run by its path from a shell without the venv."""
    return sh(repo, str(BIN / "sstl"), *args, env=outside_venv_env(), check=check)


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the metrics table (the rows that start with a model name)."""
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in MODELS
    ]


def test_report_lists_models_and_splits_in_order_with_old_new_and_change(repo: Path) -> None:
    res = sstl(repo, "report", "--rev", "HEAD~1")
    rows = table_rows(res.stdout)
    assert [(r[0], r[1]) for r in rows] == [(m, s) for m in MODELS for s in SPLITS]
    old, new = RESULTS[str(OLD_LR)], RESULTS[str(NEW_LR)]
    for model, split, *cells in rows:
        for k, metric in enumerate(("accuracy", "macro_f1", "ece")):
            a, b = old[model][split][metric], new[model][split][metric]
            assert cells[3 * k : 3 * k + 3] == [f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"], (model, split, metric)
    head = next(line for line in res.stdout.splitlines() if line.startswith("| model |"))
    assert head.split("|")[3:6] == [" accuracy old ", " accuracy new ", " accuracy change "]


def test_report_lists_the_changed_params_only(repo: Path) -> None:
    text = sstl(repo, "report", "--rev", "HEAD~1").stdout
    params = text.split("### Params changed", 1)[1].split("###", 1)[0]
    assert f"| `teacher.lr` | {OLD_LR} | {NEW_LR} |" in params
    assert "| `student.dropout` | 0.2 | 0.3 |" in params
    assert "student.lr" not in params and "seed" not in params
    assert params.index("student.dropout") < params.index("teacher.lr")  # sorted


def test_report_writes_valid_pngs_and_links_them_in_a_file(repo: Path) -> None:
    out = repo / "review/report.md"
    res = sstl(repo, "report", "--rev", "HEAD~1", "--plots", "review-plots", "--output", str(out))
    assert res.stdout == ""
    text = out.read_text()
    images = [line for line in text.splitlines() if line.startswith("![")]
    titles = [line[2 : line.index("](")] for line in images]
    assert titles == [
        "Validation loss per epoch",
        "Validation accuracy per epoch",
        "Tune convergence (teacher validation loss)",
        "Pseudo-labels per class",
        "Confusion matrices",
    ]
    for line in images:
        link = line[line.index("](") + 2 : -1]
        assert link.startswith("../review-plots/")  # relative to the markdown file: what CML uploads
        png = (out.parent / link).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR" and png.endswith(b"IEND\xaeB`\x82")
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width >= 300 and height >= 200
    assert not list(repo.glob("review-plots/.*.tmp")) and not list(out.parent.glob(".*.tmp"))


def test_report_without_dvc_on_path_and_with_a_bad_revision(repo: Path) -> None:
    assert subprocess.run(["which", "dvc"], env=outside_venv_env(), capture_output=True).returncode != 0
    res = sstl(repo, "report", "--rev", "no-such-branch", check=False)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `dvc metrics diff no-such-branch --all` failed:")


def test_report_of_an_unchanged_branch_says_so(repo: Path) -> None:
    text = sstl(repo, "report", "--rev", "HEAD").stdout
    assert "No param changed." in text
    assert all(r[4] == "+0.0000" for r in table_rows(text))


def test_exp_show_fits_120_columns_with_the_changed_params_and_accuracies(repo: Path) -> None:
    dvc(repo, "exp", "run", "--temp", "-S", f"teacher.lr={EXP_LR}", "--name", "fast-lr")
    wide = [
        "-S",
        "pseudolabel.temperature=2.5",
        "-S",
        "student.label_smoothing=0.1",
        "-S",
        "teacher.class_weights=true",
        "-S",
        "student.hidden_size=512",
        "-S",
        "pseudolabel.shard_size=4096",
    ]
    dvc(repo, "exp", "run", "--temp", *wide, "--name", "many-params-changed")
    text = sstl(repo, "exp", "show").stdout
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120, text
    assert "dvc" not in text.lower() and "md5" not in text  # no dependency hashes
    head = lines[0] + "\n" + lines[1]
    for word in ("experiment", "teacher", "student", "finetuned", "test", "t-add", "lr"):
        assert word in head, word
    fast = next(line for line in lines if line.startswith("fast-lr "))
    assert str(EXP_LR) in fast.split()
    acc = RESULTS[str(EXP_LR)]
    assert fast.split()[-6:] == [f"{acc[m][s]['accuracy']:.4f}" for m in MODELS for s in SPLITS]
    branch = next(line for line in lines if line.startswith("main "))
    assert str(NEW_LR) in branch.split()
    md = sstl(repo, "exp", "show", "--md").stdout
    assert "| teacher.lr |" in md.splitlines()[0] and "| pseudolabel.shard_size |" in md.splitlines()[0]
    assert "| finetuned test-add |" in md.splitlines()[0]
    full = sstl(repo, "exp", "show", "--full", "--md").stdout  # DVC's table: as wide as it is
    assert "teacher.lr" in full and "fast-lr" in full


def test_exp_show_names_params_that_do_not_fit() -> None:
    from sstl.review.experiments import Experiment, exp_table

    rows = [
        Experiment(
            name=f"exp{i}", rev=f"abc{i}def", params={f"section.param_{k}": i * k for k in range(20)}, accuracy={}
        )
        for i in range(3)
    ]
    text = exp_table(rows, width=80)
    assert max(map(len, text.splitlines())) <= 80
    assert "changed params not shown (sstl exp show --md): " in text.splitlines()[-1]


def test_stale_stages_leave_out_files_not_pulled_yet_but_keep_changed_code() -> None:
    # `dvc status --json` of a fresh clone without the DVC cache, one code file edited
    status = {
        "demo": [{"changed outs": {"data/demo": "not in cache"}}],
        "prepare": [{"changed deps": {"data/demo": "deleted"}}, {"changed outs": {"data/prepared": "not in cache"}}],
        "evaluate": [{"changed deps": {"data/prepared": "deleted", "src/sstl/report.py": "modified"}}],
        "tune": ["changed command"],
    }
    stale, absent = stale_stages(status)
    assert stale == {"evaluate": [{"changed deps": {"src/sstl/report.py": "modified"}}], "tune": ["changed command"]}
    assert absent == 4


def test_status_check_fails_when_the_pipeline_is_not_up_to_date(repo: Path) -> None:
    assert sstl(repo, "status", "--check").returncode == 0
    script = repo / "evaluate.py"
    original = script.read_text()
    script.write_text(original + "# changed\n")
    try:
        res = sstl(repo, "status", "--check", check=False)
    finally:
        script.write_text(original)
    assert res.returncode == 1
    assert "evaluate" in res.stdout + res.stderr


def test_report_command_help_and_plain_metrics_table(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    res = CliRunner().invoke(app, ["report"])
    assert res.exit_code == 0 and "| finetuned |" in res.stdout


def test_the_baseline_comes_first_then_the_pipeline_order() -> None:
    from sstl.review.layout import model_order

    names = ["finetuned", "student2", "probe_student", "student", "teacher", "probe"]
    assert sorted(names, key=model_order) == ["probe", "probe_student", "teacher", "student", "student2", "finetuned"]
