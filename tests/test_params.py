"""params.yaml validation: every mistake is one ParamsError line that names the offending key."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from sstl.cli.app import app
from sstl.config.train import SpaceEntry
from sstl.core.errors import ParamsError, SstlError
from sstl.models.architectures import ARCHS
from sstl.params import Params, load_params, parse_params, read_yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS_YAML = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def repo_raw() -> dict[str, Any]:
    return yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))


def with_change(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of `raw` with `dotted` (e.g. teacher.lr) set to `value`."""
    out = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def error_of(raw: Any) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "\n" not in msg, f"message must be one line: {msg!r}"
    return msg


def test_repo_params_yaml_loads() -> None:
    p = load_params(PARAMS_YAML)
    assert isinstance(p, Params)
    assert p.teacher.arch in ARCHS and p.student.arch in ARCHS
    assert p.tune.space, "the repo's params.yaml declares a search space"


def _leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    return {
        leaf
        for key, value in tree.items()
        for leaf in (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})
    }


def test_every_key_the_photo_profile_sets_is_in_params_yaml(repo_raw: dict[str, Any]) -> None:
    """`dvc exp run -S key=value` (and benchmarks/photos.py, which applies the profile so) overrides only
    keys params.yaml already holds: a key the profile sets but params.yaml lacks fails there."""
    profile = read_yaml(ROOT / "src/sstl/profiles/photos.yaml")
    profile["tune"].pop("space")  # a search space is replaced whole (`-S ~tune.space -S +tune.space=...`)
    missing = _leaves(profile) - _leaves(repo_raw)
    assert not missing, f"add to params.yaml (with its default): {sorted(missing)}"


def test_repo_params_match_raw_values(repo_raw: dict[str, Any]) -> None:
    p = parse_params(repo_raw)
    assert p.seed == repo_raw["seed"]
    assert p.teacher.lr == pytest.approx(repo_raw["teacher"]["lr"])
    assert set(p.tune.space) == set(repo_raw["tune"]["space"])


def test_empty_mapping_gives_defaults() -> None:
    p = parse_params({})
    assert p.seed == Params().seed


def test_params_error_is_an_sstl_error() -> None:
    assert issubclass(ParamsError, SstlError)
    assert ParamsError.exit_code != 0


def test_unknown_key_is_named(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "teacher.lrr", 0.01))
    assert "teacher.lrr" in msg
    assert "unknown key" in msg


def test_unknown_top_level_section_is_named(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "teachr", {"lr": 0.1}))
    assert "teachr" in msg


def test_wrong_type_names_key(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "seed", "abc"))
    assert "seed" in msg
    assert "'abc'" in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("teacher.dropout", 1.5),
        ("teacher.lr", -1),
        ("data.image_size", 2),
        ("data.val_fraction", 1.0),
        ("pseudolabel.threshold", 1.2),
        ("student.augment.rotate", 400),
        ("evaluate.ece_bins", 0),
        ("pseudolabel.temperature", 0),
        ("pseudolabel.temperature", -0.5),
    ],
)
def test_out_of_range_names_key(repo_raw: dict[str, Any], key: str, value: Any) -> None:
    msg = error_of(with_change(repo_raw, key, value))
    assert key in msg
    assert repr(value) in msg


@pytest.mark.parametrize("section", ["teacher", "student"])
def test_unknown_arch_lists_valid_ones(repo_raw: dict[str, Any], section: str) -> None:
    msg = error_of(with_change(repo_raw, f"{section}.arch", "resnet19"))
    assert f"{section}.arch" in msg
    assert "resnet19" in msg
    for arch in ARCHS:
        assert arch in msg


def test_bad_literal_names_key(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "pseudolabel.method", "best"))
    assert "pseudolabel.method" in msg


@pytest.mark.parametrize("key", ["pseudolabel.tta", "evaluate.tta"])
def test_tta_is_one_of_three(repo_raw: dict[str, Any], key: str) -> None:
    msg = error_of(with_change(repo_raw, key, "mirror"))
    assert msg.startswith(f"params.yaml: {key}:") and "'none', 'flip' or 'flip_translate'" in msg
    section, _ = key.split(".")
    p = parse_params(with_change(repo_raw, key, "flip_translate"))
    assert getattr(p, section).tta == "flip_translate"


def test_tta_and_temperature_defaults_keep_the_demo_unchanged() -> None:
    p = parse_params({})
    assert p.pseudolabel.tta == "none" and p.evaluate.tta == "none"  # digits are not mirror-symmetric
    assert p.pseudolabel.temperature == 1.0


def test_several_errors_stay_on_one_line(repo_raw: dict[str, Any]) -> None:
    raw = with_change(with_change(repo_raw, "teacher.lr", -1), "seed", "x")
    msg = error_of(raw)
    assert "teacher.lr" in msg and "seed" in msg


def test_tune_space_key_must_be_a_teacher_key(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "tune.space.gamma", {"low": 0.1, "high": 0.9}))
    assert "tune.space" in msg
    assert "gamma" in msg
    assert "not a teacher key" in msg


@pytest.mark.parametrize("key", ["arch", "weights"])
def test_tune_space_cannot_search_arch_or_weights(repo_raw: dict[str, Any], key: str) -> None:
    msg = error_of(with_change(repo_raw, f"tune.space.{key}", {"values": ["a", "b"]}))
    assert key in msg


def test_tune_space_bound_must_be_a_valid_teacher_value(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "tune.space.dropout", {"low": 0.0, "high": 1.5}))
    assert "tune.space.dropout" in msg
    assert "1.5" in msg


def test_tune_space_values_must_be_valid_teacher_values(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "tune.space.activation", {"values": ["relu", "swishy"]}))
    assert "tune.space.activation" in msg
    assert "swishy" in msg


def test_a_key_the_consistency_student_never_reads_fails_loudly(repo_raw: dict[str, Any]) -> None:
    """student.method fixmatch runs its own cosine schedule and soft targets: class weights or a linear
    schedule asked of it would be silently ignored, so they are refused, naming the key and both fixes."""
    fixmatch = with_change(repo_raw, "student.method", "fixmatch")
    assert parse_params(fixmatch).student.method == "fixmatch"  # the defaults pass
    msg = error_of(with_change(fixmatch, "student.class_weights", True))
    assert "student.class_weights" in msg and "student.method: noisy" in msg and "set it to false" in msg
    assert "student.lr_schedule" in error_of(with_change(fixmatch, "student.lr_schedule", "linear"))
    noisy = with_change(repo_raw, "student.class_weights", True)
    assert parse_params(noisy).student.class_weights, "the noisy student reads it"


def test_tune_space_float_bounds_on_an_integer_key_are_rejected(repo_raw: dict[str, Any]) -> None:
    # 2.0 and 5.0 make a real-valued range, whose inner points are no valid block counts
    raw = with_change(repo_raw, "tune.space.unfreeze_blocks", {"low": 2.0, "high": 5.0})
    with pytest.raises(ParamsError, match=r"tune\.space\.unfreeze_blocks"):
        parse_params(raw)
    raw = with_change(repo_raw, "tune.space.unfreeze_blocks", {"low": 2, "high": 5})
    assert parse_params(raw).tune.space["unfreeze_blocks"].low == 2


def test_space_entry_rejects_values_with_bounds() -> None:
    with pytest.raises(ValidationError):
        SpaceEntry(values=[1, 2], low=0, high=3)
    with pytest.raises(ValidationError):
        SpaceEntry(values=[])
    with pytest.raises(ValidationError):
        SpaceEntry(low=3, high=1)
    with pytest.raises(ValidationError):
        SpaceEntry(low=0.0, high=1.0, prior="log-uniform")
    with pytest.raises(ValidationError):
        SpaceEntry(low=1.0)


def test_space_entry_with_values_and_bounds_in_params(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "tune.space.lr", {"low": 0.001, "high": 0.01, "values": [0.1]}))
    assert "tune.space.lr" in msg


def test_space_entry_unknown_field_is_named(repo_raw: dict[str, Any]) -> None:
    msg = error_of(with_change(repo_raw, "tune.space.lr", {"low": 0.001, "hi": 0.01}))
    assert "tune.space.lr" in msg


def test_non_mapping_is_rejected() -> None:
    error_of([1, 2, 3])
    error_of(None)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 42\ndata:\n  folder: x\n   bad_indent: 1\n", encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "line 4" in msg
    assert str(path) in msg


def test_a_key_given_twice_is_one_line_naming_both_lines(tmp_path: Path) -> None:
    # PyYAML would keep the second silently, and DVC fail on it later in its own dozen lines
    path = tmp_path / "params.yaml"
    path.write_text("seed: 42\nteacher:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: key 'lr' appears twice (lines 3 and 5): keep one"
    res = CliRunner().invoke(app, ["check", "--params", str(path)])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [f"error: {info.value}"]


def test_yaml_merge_keys_still_load_and_a_list_as_a_key_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base: &b {lr: 0.1}\nteacher:\n  <<: *b\n  epochs: 3\n", encoding="utf-8")
    assert read_yaml(path)["teacher"] == {"lr": 0.1, "epochs": 3}
    path.write_text("seed: 1\n? [a, b]\n: 2\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="a key must be a plain value"):
        read_yaml(path)


def test_unclosed_bracket_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 42\nteacher:\n  lr: [0.1\n  epochs: 3\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="line"):
        load_params(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_params_reports_file_name_and_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("teacher:\n  lrr: 0.1\n", encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "teacher.lrr" in str(info.value)


@pytest.mark.parametrize("key", ["precision.train", "precision.infer"])
def test_precision_is_checked(repo_raw: dict[str, Any], key: str) -> None:
    msg = error_of(with_change(repo_raw, key, "fp8"))
    assert msg.startswith(f"params.yaml: {key}:") and "'fp32', 'bf16' or 'fp16'" in msg
    for value in ("bf16", "fp16"):  # fp16 is checked against the device when the runtime is built
        section = parse_params(with_change(repo_raw, key, value)).precision
        assert getattr(section, key.split(".")[1]) == value


@pytest.mark.parametrize(("size", "ok"), [(7, False), (2048, False), ("auto", True), ("big", False), (224, True)])
def test_image_size_is_a_side_in_range_or_auto(repo_raw: dict[str, Any], size: object, ok: bool) -> None:
    raw = with_change(repo_raw, "data.image_size", size)
    if ok:
        assert parse_params(raw).data.image_size == size
    else:
        assert error_of(raw).startswith("params.yaml: data.image_size")


def test_auto_image_size_and_interpolation_follow_the_backbones(repo_raw: dict[str, Any]) -> None:
    raw = with_change(repo_raw, "data.image_size", "auto")
    raw["teacher"]["arch"], raw["student"]["arch"] = "tf_efficientnet_lite0", "tf_efficientnet_lite2"
    p = parse_params(raw)
    assert p.image_size() == 260, "the larger input size: Lite2's"
    assert p.interpolation() == "bicubic"
    raw["data"]["interpolation"] = "bilinear"
    assert parse_params(raw).interpolation() == "bilinear"


def test_photo_profile_merges_and_validates(repo_raw: dict[str, Any]) -> None:
    from sstl.params import apply_profile

    merged = apply_profile(repo_raw, "photos", "/data/my-photos")
    assert merged["data"]["folder"] == "/data/my-photos"
    assert merged["teacher"]["weights"] == "imagenet" and merged["tune"]["frozen_backbone"] is True
    assert set(merged["tune"]["space"]) != set(repo_raw["tune"]["space"]), "the search space is replaced whole"
    assert merged["seed"] == repo_raw["seed"], "what the profile leaves alone is kept"
    with pytest.raises(SstlError, match="unknown profile 'fotos': choose one of photos"):
        apply_profile(repo_raw, "fotos")


def test_sstl_profile_keeps_every_comment_and_writes_what_the_profile_merges(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    photos = tmp_path / "my-photos"
    photos.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        res = CliRunner().invoke(app, ["profile", "photos", "--folder", str(photos)])
    assert res.exit_code == 0, res.output
    after = params.read_text()
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert comments and [line.split("#", 1)[1] for line in after.splitlines() if "#" in line] == comments
    from sstl.params import apply_profile

    # what PyYAML (sstl, YAML 1.1) reads back is the merged mapping: floats such as 5e-05 stay floats
    assert yaml.safe_load(after) == apply_profile(yaml.safe_load(before), "photos", str(photos))
    assert load_params(params).data.folder == str(photos)


TWO_ROUNDS = [{"teacher": "teacher", "student": "student"}, {"teacher": "student", "student": "student2"}]


def test_rounds_default_to_one_and_chain_teacher_to_student(repo_raw: dict[str, Any]) -> None:
    assert parse_params(repo_raw).students() == ["student"]
    p = parse_params(with_change(repo_raw, "rounds", TWO_ROUNDS))
    assert p.students() == ["student", "student2"]
    assert p.round_of(teacher="student") == (1, p.rounds[1]) == p.round_of(student="student2")
    with pytest.raises(ParamsError, match="no round with teacher=student2"):
        p.round_of(teacher="student2")


@pytest.mark.parametrize(
    ("rounds", "named"),
    [
        ([], "rounds: needs at least one round"),
        ([{"teacher": "student", "student": "x"}], "round 1's teacher is 'student': it must be the model before it"),
        ([TWO_ROUNDS[0], {"teacher": "teacher", "student": "s2"}], "round 2's teacher is 'teacher'"),
        ([TWO_ROUNDS[0], {"teacher": "student", "student": "student"}], "round 2's student 'student' is taken"),
        ([{"teacher": "teacher", "student": "finetuned"}], "round 1's student 'finetuned' is taken"),
        ([{"teacher": "teacher", "student": "student-2"}], "rounds.0.student: String should match pattern"),
        ([{"teacher": "teacher"}], "rounds.0.student: Field required"),
    ],
)
def test_a_broken_round_chain_is_one_line_naming_rounds(repo_raw: dict[str, Any], rounds: list, named: str) -> None:
    assert named in error_of(with_change(repo_raw, "rounds", rounds))
