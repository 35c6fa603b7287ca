"""params.yaml, typed and validated: a typo, a wrong type or a value out of range fails loudly.

The sections mirror the stages; each stage reads the whole file (so it is checked before anything is
written) and hands the typed pieces it needs to the library.
"""

from __future__ import annotations

import io
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sstl.config.data import CorruptConfig, NearDupConfig
from sstl.config.model import ModelConfig
from sstl.config.pseudo import SelectConfig
from sstl.config.runtime import DEVICE_HELP, TTA_HELP, Precision, Tta
from sstl.config.serve import ServeConfig
from sstl.config.train import AugmentConfig, ConsistencyConfig, PretrainConfig, SpaceEntry, TrainConfig
from sstl.core.errors import ParamsError, SstlError
from sstl.core.files import write_text
from sstl.models.factory import check_arch, data_config
from sstl.runtime.device import Runtime, make_runtime


def _arch(v: str) -> str:
    try:
        return check_arch(v)
    except SstlError as err:
        raise ValueError(str(err)) from None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(Strict):
    folder: str = Field("data/demo", description="image folder: labeled/, unlabeled/, test/, [val/], [test-add/]")
    image_size: int | Literal["auto"] = Field(
        32, description="side of the packed square images, pixels; auto = the larger input size of teacher and student"
    )
    interpolation: Literal["auto", "bilinear", "bicubic", "nearest", "lanczos"] = Field(
        "auto", description="resampling when packing; auto = the teacher backbone's (timm data config)"
    )
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="share of labeled moved to val when no val/")
    refit: bool = Field(
        False,
        description="every label counts: val chooses (tune's trials, the teacher's epochs), then the probes, "
        "students and finetune train on labeled + val, and the model to use is the fine-tuned student",
    )
    neardup: NearDupConfig = NearDupConfig(enabled=False)
    test_add_corruptions: CorruptConfig | None = Field(
        None, description="build test-add from test under seeded corruptions (folder without test-add/)"
    )

    @field_validator("image_size")
    @classmethod
    def _side(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 8 <= v <= 1024:
            raise ValueError(f"{v} pixels is out of range: 8..1024, or auto")
        return v


class DemoParams(Strict):
    labels_per_class: int = Field(20, ge=2, le=100)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    test_add_fraction: float = Field(0.1, gt=0.0, lt=0.5)


class PrecisionParams(Strict):
    """fp32, bf16 or fp16 (GPU only) autocast (see sstl.runtime.device), chosen apart for training and for
    inference: in inference it changes no decision worth counting; in training it costs some accuracy
    (reports/benchmarks/precision.md)."""

    train: Precision = Field("fp32", description="pretrain, tune trials, teacher, student, finetune")
    infer: Precision = Field("fp32", description="pseudolabel and evaluate")


class MlflowParams(Strict):
    experiment: str = Field("sstl", min_length=1)
    model_name: str | None = Field(
        "sstl",
        min_length=1,
        pattern=r"^[\w.-]+$",
        description="registered model the fine-tuned student is published to (null: not registered)",
    )


class TeacherParams(ModelConfig, TrainConfig):
    """Teacher network and schedule; `tune` searches some of these keys."""

    augment: AugmentConfig | None = Field(
        None, description="light augmentation, e.g. airbench's flip + translate (all batched); none by default"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return _arch(v)

    def model(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model_dump(include=set(ModelConfig.model_fields)))

    def schedule(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(include=set(TrainConfig.model_fields)))


class StudentParams(TeacherParams):
    augment: AugmentConfig = AugmentConfig()  # the student is always augmented
    pseudo_targets: Literal["hard", "soft"] = Field(
        "hard", description="soft: the teacher's distribution (pseudolabel.temperature) as each pseudo-label's target"
    )
    method: Literal["noisy", "fixmatch"] = Field(
        "noisy",
        description="noisy: trained on labelled + pseudo-labelled photos (the seeds' noisy student); fixmatch: "
        "consistency training on the whole pool, the top blocks on cached bottom activations (`consistency`), "
        "its own cosine schedule: class_weights, lr_schedule, lookahead, bias_lr_scale, monitor and pseudo_targets "
        "are the noisy student's and refused away from their defaults",
    )
    consistency: ConsistencyConfig = ConsistencyConfig()

    @model_validator(mode="after")
    def _fixmatch_reads_it(self) -> StudentParams:
        # the consistency student runs FixMatch's own schedule (cosine over `epochs` passes, last weights) and
        # distils soft targets: a key it never reads, set away from its default, fails here, not quietly
        if self.method == "fixmatch":
            for key in _FIXMATCH_IGNORES:
                default = type(self).model_fields[key].default
                if getattr(self, key) != default:
                    raise ValueError(
                        f"student.{key}: {_yaml(getattr(self, key))} has no effect with student.method fixmatch "
                        f"(FixMatch's cosine schedule over student.epochs, soft distillation targets): set it to "
                        f"{_yaml(default)} or student.method: noisy"
                    )
        return self


# what the noisy student reads and the consistency one does not (sstl.train.consistency)
_FIXMATCH_IGNORES = ("class_weights", "lr_schedule", "lookahead", "bias_lr_scale", "monitor", "pseudo_targets")


def _yaml(value: object) -> str:
    """`value` as params.yaml spells it (false, not False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


class FinetuneParams(Strict):
    """The student fine-tuned on the clean labelled set, all blocks trainable, at a small LR."""

    lr: float = Field(1e-4, gt=0.0, le=100.0)
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(3, ge=1)
    plateau_patience: int = Field(1, ge=0)
    unfreeze_blocks: int = Field(1000, ge=0, description="top backbone blocks trained (1000: all)")
    freeze_bn: bool = Field(False, description="BatchNorm keeps the student's statistics")
    monitor: Literal["val_loss", "val_acc"] = Field("val_loss", description="what early stopping follows")
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    lr_schedule: Literal["plateau", "linear"] = "plateau"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)

    def schedule(self) -> TrainConfig:
        return TrainConfig(
            optimizer=self.optimizer,
            momentum=self.momentum,
            lr_schedule=self.lr_schedule,
            label_smoothing=self.label_smoothing,
            weight_decay=self.weight_decay,
            head_epochs=0,
            epochs=self.epochs,
            lr=self.lr,
            finetune_lr=self.lr,
            unfreeze_blocks=self.unfreeze_blocks,
            freeze_bn=self.freeze_bn,
            monitor=self.monitor,
            batch_size=self.batch_size,
            patience=self.patience,
            plateau_patience=self.plateau_patience,
        )


class TuneParams(Strict):
    enabled: bool = Field(True, description="false: no trials, the teacher keys are used as given")
    n_random: int = Field(10, ge=1, description="random trials before the guided ones")
    n_guided: int = Field(15, ge=0, description="Gaussian-process guided trials")
    frozen_backbone: bool = Field(
        False, description="trials train the head only, on backbone features computed once (phase 1)"
    )
    space: dict[str, SpaceEntry] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _teacher_keys(cls, space: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        allowed = set(TeacherParams.model_fields) - {"arch", "weights", "augment"}
        unknown = sorted(set(space) - allowed)
        if unknown:
            raise ValueError(f"not a teacher key: {', '.join(unknown)} (valid: {', '.join(sorted(allowed))})")
        return space


MODEL_NAME = r"^[a-z][a-z0-9_]*$"  # a file stem, a metrics key and a confusion-file prefix: no dots, no hyphens
RESERVED = ("teacher", "finetuned", "pretrain")  # the other models' files in models/


class RoundParams(Strict):
    """One noisy-student round: `teacher` pseudo-labels the pool, `student` learns from it (models/<name>.pt)."""

    teacher: str = Field(pattern=MODEL_NAME)
    student: str = Field(pattern=MODEL_NAME)


def _check_chain(rounds: list[RoundParams]) -> list[RoundParams]:
    """Round 1 learns from the teacher, round r from round r-1's student; students are new names."""
    if not rounds:
        raise ValueError("needs at least one round: [{teacher: teacher, student: student}]")
    before = "teacher"
    for i, r in enumerate(rounds):
        if r.teacher != before:
            raise ValueError(f"round {i + 1}'s teacher is {r.teacher!r}: it must be the model before it, {before!r}")
        if r.student in RESERVED or r.student in [x.student for x in rounds[:i]]:
            free = "student" if i == 0 else f"student{i + 1}"
            raise ValueError(f"round {i + 1}'s student {r.student!r} is taken: name it e.g. {free}")
        before = r.student
    return rounds


class EvaluateParams(Strict):
    ece_bins: int = Field(15, ge=1, le=100)
    tta: Tta = Field("none", description=f"{TTA_HELP}; `sstl predict` follows it")


class ProbeParams(Strict):
    """The frozen-feature baseline (sstl.eval.probe): logistic regression on each backbone's features."""

    enabled: bool = Field(True, description="false: no probe (and no baseline warning)")
    folds: int = Field(5, ge=2, le=20, description="stratified k-fold cross-validation on the labelled rows")
    C: list[float] = Field(
        default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
        min_length=1,
        description="inverse L2 strengths the cross-validation chooses among",
    )
    max_iter: int = Field(2000, ge=10)
    extra: list[str] = Field(
        default_factory=list,
        description="ImageNet backbones (archs) probed beside the teacher's and the student's, as `probe_<arch>`: "
        "more baselines, and with pseudolabel.with_probe more frozen views of the pool in the distillation targets",
    )

    @field_validator("C")
    @classmethod
    def _positive(cls, grid: list[float]) -> list[float]:
        if any(c <= 0 for c in grid):
            raise ValueError("every C must be > 0")
        return grid


class Params(Strict):
    seed: int = Field(42, ge=0)
    device: str = Field("auto", min_length=1, description=DEVICE_HELP)
    precision: PrecisionParams = PrecisionParams()
    data: DataParams = DataParams()
    demo: DemoParams = DemoParams()
    mlflow: MlflowParams = MlflowParams()
    pretrain: PretrainConfig = PretrainConfig()
    tune: TuneParams = TuneParams()
    teacher: TeacherParams = TeacherParams()
    pseudolabel: SelectConfig = SelectConfig()
    student: StudentParams = StudentParams(arch="resnet34")
    rounds: list[RoundParams] = Field(
        default_factory=lambda: [RoundParams(teacher="teacher", student="student")],
        description="noisy-student rounds (DVC foreach): each student learns from the model before it",
    )
    finetune: FinetuneParams = FinetuneParams()
    probe: ProbeParams = ProbeParams()
    evaluate: EvaluateParams = EvaluateParams()
    serve: ServeConfig = ServeConfig()

    def runtime(self, part: Literal["train", "infer"]) -> Runtime:
        """The device and precision of a stage: built once at its top, passed to all it computes."""
        return make_runtime(self.device, getattr(self.precision, part))

    def image_size(self) -> int:
        """Packed side: data.image_size, or with `auto` the larger input size of teacher and student."""
        if self.data.image_size != "auto":
            return self.data.image_size
        return max(data_config(self.teacher.arch).input_size, data_config(self.student.arch).input_size)

    def interpolation(self) -> str:
        return (
            data_config(self.teacher.arch).interpolation
            if self.data.interpolation == "auto"
            else self.data.interpolation
        )

    @field_validator("rounds")
    @classmethod
    def _rounds_chain(cls, rounds: list[RoundParams]) -> list[RoundParams]:
        return _check_chain(rounds)

    def students(self) -> list[str]:
        """Every round's student, in pipeline order; the last one is fine-tuned."""
        return [r.student for r in self.rounds]

    def round_of(self, *, student: str | None = None, teacher: str | None = None) -> tuple[int, RoundParams]:
        """(index, round) of the round that trains `student`, or whose pseudo-labels `teacher` makes."""
        for i, r in enumerate(self.rounds):
            if student in (None, r.student) and teacher in (None, r.teacher):
                return i, r
        chain = " -> ".join(["teacher", *self.students()])
        raise ParamsError(f"rounds: no round with teacher={teacher} student={student} (params.yaml's chain: {chain})")

    @model_validator(mode="after")
    def _tuned_values_fit(self) -> Params:
        # every corner of the search space must itself be a valid teacher: fail now, not at trial 17
        for key, entry in self.tune.space.items():
            for value in _probe_points(entry):
                try:
                    TeacherParams.model_validate({**self.teacher.model_dump(), key: value})
                except ValidationError as err:
                    raise ValueError(
                        f"tune.space.{key}: {value!r} is not a valid teacher.{key}: {err.errors()[0]['msg']}"
                    ) from None
        return self


def _probe_points(entry: SpaceEntry) -> list[Any]:
    """Values the search may propose: the listed ones, or both ends and an inner point of a range."""
    if entry.values is not None:
        return list(entry.values)
    low, high = entry.low, entry.high
    assert low is not None and high is not None
    if isinstance(low, int) and isinstance(high, int):
        return [low, high, (low + high) // 2]
    return [low, high, low + 0.37 * (high - low)]  # an inner point that is no whole number


def describe(err: ValidationError) -> str:
    """All of pydantic's complaints on one line, each naming its key: `teacher.lr: ...`."""
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against params.yaml's documented keys)"
        parts.append(
            (f"{key}: " if key else "")
            + msg
            + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e["input"], dict) else "")
        )
    return "; ".join(parts)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections (seed, data, teacher, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{source}: {describe(err)}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the project root (where dvc.yaml is)")
    return parse_params(read_yaml(path), str(path))


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word (DVC then fails in its own way): refuse them."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # `<<: *anchor` merge keys, as SafeLoader reads them
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise ParamsError(f"line {key_node.start_mark.line + 1}: a key must be a plain value, not {key!r}")
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ParamsError(f"key {key!r} appears twice (lines {seen[key]} and {line}): keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error or a key given twice is one ParamsError naming the line."""
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML{_where(err, text)}: fix the syntax") from None


def _where(err: yaml.YAMLError, text: str) -> str:
    """' at line N (`the line`): the problem'. A key missing its colon is noticed a line later: PyYAML's
    context mark ("while scanning a simple key") points at the line the user wrote wrong."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if getattr(err, "context", None) == "while scanning a simple key" and getattr(err, "context_mark", None):
        mark = err.context_mark
    if mark is None:
        return ""
    lines = text.splitlines()
    n = _keyless_line(lines, mark.line)
    line = lines[n].strip() if n < len(lines) else ""
    return f" at line {n + 1} (`{line}`)" + (f": {problem}" if problem else "")


def _keyless_line(lines: list[str], n: int) -> int:
    """`n`, or the line just above it at the same indent that has no `key:` (a missing colon makes
    PyYAML read it as the start of a multi-line value and fail a line later)."""
    if n == 0 or n >= len(lines):
        return n
    above, here = lines[n - 1], lines[n]
    indent = len(here) - len(here.lstrip())
    plain = above.strip() and not above.lstrip().startswith(("#", "- ")) and ":" not in above
    return n - 1 if plain and len(above) - len(above.lstrip()) == indent else n


PROFILES = Path(__file__).parent / "profiles"
REPLACED = ("tune.space",)  # sections a profile replaces whole instead of merging into


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def apply_profile(raw: dict[str, Any], name: str, folder: str | None = None) -> dict[str, Any]:
    """params.yaml's mapping with profile `name` merged in (and `data.folder` set); validated, not written."""
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise SstlError(f"unknown profile {name!r}: choose one of {', '.join(profile_names())}")
    merged = _merge(raw, yaml.safe_load(path.read_text(encoding="utf-8")), "")
    if folder is not None:
        merged.setdefault("data", {})["folder"] = folder
    parse_params(merged, f"params.yaml with profile {name}")
    return merged


def write_profile(path: Path, name: str, folder: str | None = None) -> None:
    """Apply profile `name` to the params file at `path` in place, its comments and layout kept (a
    round-trip YAML): only the values the profile changes are rewritten. Validated before writing."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    merged = apply_profile(read_yaml(path) or {}, name, folder)
    rt = YAML()  # round-trip: comments, key order, flow style and quotes survive
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long line
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    rt.representer.add_representer(float, _represent_float)
    doc = rt.load(path.read_text(encoding="utf-8")) or CommentedMap()
    _sync(doc, merged)
    out = io.StringIO()
    rt.dump(doc, out)
    write_text(path, out.getvalue())


def _represent_float(representer: Any, value: float) -> Any:
    """Floats every YAML reader takes as floats: PyYAML (YAML 1.1) reads `5e-05` as a string."""
    text = "null" if value != value else repr(value)
    if text in ("inf", "-inf"):
        text = text.replace("inf", ".inf")
    elif "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _sync(doc: Any, new: dict[str, Any]) -> None:
    """Make the round-trip mapping `doc` equal `new`, touching only the keys whose values differ; a new
    mapping of plain values is written inline, as params.yaml writes them (`{low: 1, high: 4}`)."""
    from ruamel.yaml.comments import CommentedMap

    for key in [k for k in doc if k not in new]:
        del doc[key]
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _sync(doc[key], value)
        elif key not in doc or doc[key] != value:
            if isinstance(value, dict) and not any(isinstance(v, (dict, list)) for v in value.values()):
                value = CommentedMap(value)
                value.fa.set_flow_style()
            doc[key] = value


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and f"{prefix}{key}" not in REPLACED:
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out
