"""The pull request workflow (.github/workflows/review.yml): well formed, and its own sstl commands run
against a tiny real git + DVC repo, so the file cannot drift from the command line."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_report import BIN, build_repo, outside_venv_env

WORKFLOW = ROOT / ".github/workflows/review.yml"
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@(v\d+(\.\d+){0,2}|[0-9a-f]{40})$")


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def run_lines(workflow: dict, word: str) -> list[str]:
    """The `run:` commands that mention `word`, one per step."""
    return [step["run"] for step in steps(workflow) if word in step.get("run", "")]


def test_triggers_on_pull_requests_with_permission_to_comment(workflow: dict) -> None:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    assert "pull_request" in on
    assert workflow["permissions"]["pull-requests"] == "write"


def test_every_step_either_uses_a_pinned_action_or_runs_a_command(workflow: dict) -> None:
    for step in steps(workflow):
        assert ("uses" in step) != ("run" in step), step
        if "uses" in step:
            assert PINNED.match(step["uses"]), f"{step['uses']}: pin a version (@v4) or a commit"
    used = {step["uses"].split("@")[0] for step in steps(workflow) if "uses" in step}
    assert {"actions/checkout", "actions/setup-python", "iterative/setup-cml"} <= used
    checkout = next(s for s in steps(workflow) if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0  # the base branch's commits, for --rev origin/<base>


def test_installs_exactly_as_the_readme_says(workflow: dict) -> None:
    readme = (ROOT / "README.md").read_text()
    install = run_lines(workflow, "pip install")
    assert len(install) == 1 and install[0].strip() in readme


def test_comments_with_cml_and_the_token(workflow: dict) -> None:
    comment = next(s for s in steps(workflow) if "cml comment" in s.get("run", ""))
    assert comment["env"]["REPO_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    assert "--publish" in comment["run"] and "report.md" in comment["run"]
    report = run_lines(workflow, "sstl report")
    assert len(report) == 1 and "report.md" in report[0] and "--rev origin/${{ github.base_ref }}" in report[0]


def _local(command: str) -> str:
    """A workflow command as it runs here: this venv activated, the PR's base = the previous commit."""
    return command.replace(". .venv/bin/activate", f". {BIN / 'activate'}").replace(
        "origin/${{ github.base_ref }}", "HEAD~1"
    )


def _bash(repo: Path, command: str) -> subprocess.CompletedProcess[str]:
    assert "${{" not in command, command
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=repo, env=outside_venv_env(), text=True, capture_output=True
    )


def test_the_workflows_own_commands_run_in_a_tiny_repo(workflow: dict, tmp_path: Path) -> None:
    repo = build_repo(tmp_path / "repo")
    check, after = run_lines(workflow, "status --check")  # before the pipeline (the committed lock), and after
    assert check == after
    res = _bash(repo, _local(check))
    assert res.returncode == 0, res.stdout + res.stderr
    (report,) = run_lines(workflow, "sstl report")
    res = _bash(repo, _local(report))
    assert res.returncode == 0, res.stdout + res.stderr
    text = (repo / "report.md").read_text()
    assert "`teacher.lr`" in text and "| finetuned | test-add |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((repo / link).read_bytes()[:4] == b"\x89PNG" for link in links)
    # a stale pipeline fails the check step, so no comment is posted from results that do not match the code
    (repo / "evaluate.py").write_text((repo / "evaluate.py").read_text() + "# changed\n")
    res = _bash(repo, _local(check))
    assert res.returncode == 1 and "evaluate" in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("error: the pipeline is not up to date")


TESTS = ROOT / ".github/workflows/test.yml"


def test_the_test_workflow_runs_the_readmes_commands_on_push_and_pull_request() -> None:
    tests = yaml.safe_load(TESTS.read_text())
    on = tests.get("on", tests.get(True))  # YAML 1.1 reads the key `on` as true
    assert "push" in on and "pull_request" in on
    readme = (ROOT / "README.md").read_text()
    runs = [step["run"] for step in steps(tests) if "run" in step]
    install = [r for r in runs if "pip install" in r]
    assert len(install) == 1 and install[0].strip() in readme
    test_command = re.search(r"^(python -m pytest)\s+#", readme, re.M)
    assert test_command, "the README shows the test command"
    assert runs[-1].strip().endswith(". .venv/bin/activate && " + test_command[1])
    for step in steps(tests):
        if "uses" in step:
            assert PINNED.match(step["uses"]), f"{step['uses']}: pin a version (@v4) or a commit"
