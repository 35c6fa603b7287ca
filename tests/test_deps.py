"""Stage code deps are derived from imports: dvc.yaml lists exactly what each stage script runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from conftest import ROOT
from typer.testing import CliRunner

from sstl.cli.app import app
from sstl.core.codedeps import code_deps, drift, write_deps


def test_dvc_yaml_lists_exactly_the_code_each_stage_imports() -> None:
    problems = drift(ROOT / "dvc.yaml")
    assert not problems, f"dvc.yaml code deps drifted from the imports, run `sstl deps`: {problems}"


def _package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_closure_follows_lazy_and_transitive_imports_and_skips_the_rest(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "stages/_helper.py": "import sys\n",
            "stages/go.py": "import _helper\nfrom sstl.a import f\n",
            "src/sstl/__init__.py": "",
            "src/sstl/a.py": "def f():\n    from sstl import b\n    return b\n",
            "src/sstl/b.py": "from sstl.c import X\n",
            "src/sstl/c.py": "X = 1\n",
            "src/sstl/unused.py": "import sstl.a\n",
        },
    )
    assert code_deps(tmp_path / "stages/go.py", tmp_path) == [
        "src/sstl/__init__.py",
        "src/sstl/a.py",
        "src/sstl/b.py",
        "src/sstl/c.py",
        "stages/_helper.py",
        "stages/go.py",
    ]


def test_a_module_deep_in_a_subpackage_brings_every_package_init_above_it(tmp_path: Path) -> None:
    # importing sstl.train.loop runs sstl/__init__.py and sstl/train/__init__.py first; `from sstl.data
    # import dataset` names a module, and its own package's __init__ counts too
    _package(
        tmp_path,
        {
            "stages/go.py": "from sstl.train.loop import fit\n",
            "src/sstl/__init__.py": "",
            "src/sstl/train/__init__.py": '"""Layer train."""\n',
            "src/sstl/train/loop.py": "from sstl.data import dataset\n\ndef fit():\n    return dataset\n",
            "src/sstl/data/__init__.py": "",
            "src/sstl/data/dataset.py": "X = 1\n",
            "src/sstl/data/other.py": "Y = 2\n",
            "src/sstl/eval/__init__.py": "",
        },
    )
    assert code_deps(tmp_path / "stages/go.py", tmp_path) == [
        "src/sstl/__init__.py",
        "src/sstl/data/__init__.py",
        "src/sstl/data/dataset.py",
        "src/sstl/train/__init__.py",
        "src/sstl/train/loop.py",
        "stages/go.py",
    ]


def test_a_new_import_is_drift_and_sstl_deps_fixes_it_keeping_comments(tmp_path: Path, monkeypatch) -> None:
    for item in ("stages", "src"):
        shutil.copytree(ROOT / item, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "src/sstl/extra.py").write_text("Y = 2\n")
    demo = tmp_path / "stages/demo.py"
    demo.write_text(demo.read_text() + "\nfrom sstl.extra import Y  # noqa: E402\n")
    assert drift(tmp_path / "dvc.yaml") == {"demo": (["src/sstl/extra.py"], [])}

    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["deps", "--check"]).exit_code == 1
    result = CliRunner().invoke(app, ["deps"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output
    assert drift(tmp_path / "dvc.yaml") == {}
    text = (tmp_path / "dvc.yaml").read_text()
    assert "# data.image_size / interpolation: auto follow the backbones" in text  # comments kept
    stages = yaml.safe_load(text)["stages"]
    assert "src/sstl/extra.py" in stages["demo"]["deps"]
    assert "src/sstl/extra.py" not in stages["evaluate"]["deps"]
    assert write_deps(tmp_path / "dvc.yaml") == []  # idempotent


def test_a_foreach_stage_is_checked_and_fixed_in_its_do_template(tmp_path: Path) -> None:
    for item in ("stages", "src"):
        shutil.copytree(ROOT / item, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert "foreach" in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]["pseudolabel"]  # rounds
    (tmp_path / "src/sstl/extra.py").write_text("Y = 2\n")
    script = tmp_path / "stages/pseudolabel.py"
    script.write_text(script.read_text() + "\nfrom sstl.extra import Y  # noqa: E402\n")
    assert drift(tmp_path / "dvc.yaml") == {"pseudolabel": (["src/sstl/extra.py"], [])}
    assert write_deps(tmp_path / "dvc.yaml") == ["pseudolabel"]
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "src/sstl/extra.py" in stages["pseudolabel"]["do"]["deps"]
    assert "data/pseudolabels/${item.teacher}.csv" in stages["pseudolabel"]["do"]["outs"]  # the template kept
    assert drift(tmp_path / "dvc.yaml") == {}


def test_sstl_deps_adds_code_deps_to_a_stage_that_lists_none_and_reads_commented_headers(tmp_path: Path) -> None:
    _package(
        tmp_path,
        {
            "stages/go.py": "from sstl.a import f\n",
            "stages/other.py": "import sys\n",
            "src/sstl/__init__.py": "",
            "src/sstl/a.py": "def f():\n    return 1\n",
        },
    )
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  other:  # listed first, already right\n"
        "    cmd: python stages/other.py\n"
        "    deps:\n"
        "      - stages/other.py\n"
        "  go:  # a comment on the header\n"
        "    cmd: python stages/go.py\n"
        "    deps:\n"
        "      - data/x\n"
    )
    assert write_deps(tmp_path / "dvc.yaml") == ["go"]
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert stages["go"]["deps"] == ["src/sstl/__init__.py", "src/sstl/a.py", "stages/go.py", "data/x"]
    assert stages["other"]["deps"] == ["stages/other.py"]


def test_the_code_digest_of_a_stage_changes_with_its_deps_only(tmp_path: Path) -> None:
    from sstl.core.provenance import code_digest

    _package(
        tmp_path,
        {
            "stages/go.py": "from sstl.a import f\n",
            "src/sstl/__init__.py": "",
            "src/sstl/a.py": "def f():\n    return 1\n",
            "src/sstl/cli.py": "X = 1\n",
        },
    )
    first = code_digest(tmp_path / "stages/go.py")
    (tmp_path / "src/sstl/cli.py").write_text("X = 2\n")  # not run by the stage: same digest, same checkpoint
    assert code_digest(tmp_path / "stages/go.py") == first
    (tmp_path / "src/sstl/a.py").write_text("def f():\n    return 2\n")
    assert code_digest(tmp_path / "stages/go.py") != first
