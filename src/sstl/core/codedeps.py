"""A stage's code dependencies, derived from what its script imports, so `dvc.yaml` cannot drift.

DVC re-runs a stage when a dep changes; listing the modules by hand missed some (a change to a
shared function left stages stale), and listing the whole package re-ran every stage for any
change. The import graph is read from the source (ast), lazy imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

PACKAGE = "sstl"


def imported_modules(source: Path, package: str = PACKAGE) -> set[str]:
    """Dotted names of `package` modules that `source` imports, anywhere in the file.

    `from sstl.track import tracking` names the module `sstl.track.tracking` when such a module exists."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"), filename=str(source))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def module_file(name: str, src: Path) -> Path | None:
    """sstl.x.y -> src/sstl/x/y.py (or its package's __init__.py); None for a name that is no module."""
    base = src.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def code_deps(script: Path, root: Path, package: str = PACKAGE) -> list[str]:
    """Every file whose code the stage `script` runs: itself, the stage helpers it imports, and the
    transitive closure of its package imports; paths relative to `root`, sorted."""
    src = root / "src"
    files = {script.resolve()}
    local = {p.stem: p for p in script.parent.glob("*.py")}
    todo = [script]
    while todo:
        source = todo.pop()
        names = imported_modules(source, package) | _local_imports(source, local)
        for name in sorted(names):
            path = local.get(name) or module_file(name, src)
            if path is None or path.resolve() in files:
                continue
            files.add(path.resolve())
            todo.append(path)
            for init in _package_inits(path, src):  # importing sstl.a.b runs sstl/__init__.py and sstl/a/__init__.py
                if init.resolve() not in files:
                    files.add(init.resolve())
                    todo.append(init)
    return sorted(str(f.relative_to(root.resolve())) for f in files)


def _package_inits(path: Path, src: Path) -> list[Path]:
    """The `__init__.py` of every package above `path` inside `src`, outermost first."""
    if not path.is_relative_to(src):
        return []
    parents = [p for p in path.parents if p.is_relative_to(src) and p != src]
    return [p / "__init__.py" for p in reversed(parents) if (p / "__init__.py").is_file()]


def _local_imports(source: Path, local: dict[str, Path]) -> set[str]:
    """Sibling modules a stage script imports by bare name (e.g. `import _checkout`)."""
    if source.parent.resolve() != next(iter(local.values()), source).parent.resolve():
        return set()
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name in local}


def _stages(dvc_yaml: Path) -> dict[str, dict]:
    """Stage name -> its definition; a `foreach` group's is its `do` template (one per group)."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def stage_scripts(dvc_yaml: Path) -> dict[str, Path]:
    """Stage name -> the `stages/*.py` script its cmd runs (stages with another cmd are left out)."""
    out = {}
    for name, stage in _stages(dvc_yaml).items():
        words = str(stage.get("cmd", "")).split()
        scripts = [w for w in words if w.startswith("stages/") and w.endswith(".py")]
        if scripts:
            out[name] = dvc_yaml.parent / scripts[0]
    return out


def drift(dvc_yaml: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Stage -> (code deps missing from dvc.yaml, listed code deps the stage does not run); only
    stages that differ. Code deps are the listed `.py` files and folders under stages/ and src/."""
    root = dvc_yaml.parent
    stages = _stages(dvc_yaml)
    out = {}
    for name, script in stage_scripts(dvc_yaml).items():
        wanted = set(code_deps(script, root))
        listed = {d for d in map(str, stages[name].get("deps", [])) if d.split("/")[0] in ("stages", "src")}
        if wanted != listed:
            out[name] = (sorted(wanted - listed), sorted(listed - wanted))
    return out


def write_deps(dvc_yaml: Path) -> list[str]:
    """Rewrite each stage's code deps in `dvc.yaml` from its imports, right after its `deps:` line (other
    lines, comments included, stay as they are); returns the stages whose deps were rewritten."""
    lines = dvc_yaml.read_text(encoding="utf-8").splitlines(keepends=True)
    changed, scripts = set(drift(dvc_yaml)), stage_scripts(dvc_yaml)
    stage, done, out = None, [], []
    for line in lines:
        text = line.split("#")[0].rstrip()
        if line.startswith("  ") and not line.startswith("   ") and text.endswith(":"):
            stage = text.strip()[:-1]
        item = text.strip()[2:].strip() if text.strip().startswith("- ") else ""
        if stage in changed and item.split("/")[0] in ("stages", "src"):
            continue  # the derived list replaces every listed code dep
        out.append(line)
        if stage in changed and text.strip() == "deps:" and stage not in done:
            indent = " " * (len(line) - len(line.lstrip()) + 2)
            out += [f"{indent}- {d}\n" for d in code_deps(scripts[stage], dvc_yaml.parent)]
            done.append(stage)
    if done:
        from sstl.core.files import write_text

        write_text(dvc_yaml, "".join(out))
    return done
