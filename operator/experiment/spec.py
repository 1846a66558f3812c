"""ExperimentSpec: the desired state a user writes, as a bare YAML spec or as the `spec` of an
`Experiment` object (apiVersion xstilts.dev/v1alpha1). Field names are camelCase, as in any
Kubernetes object; Python code uses the snake_case attributes.

Validation is strict: every error names its field path, the bad value and what is valid.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from xstilts.trainer.config import (
    CONTROL_CHARACTERS,
    DeepSpeedSettings,
    HyperParameters,
    OffloadMode,
    choose_deepspeed,
)
from xstilts.trainer.tasks import INTERMEDIATE_TASKS, TARGET_TASKS, TASKS

API_GROUP = "xstilts.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "Experiment"
BASELINE = "baseline"

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Experiment and model names end up inside Job names (<experiment>-<run id>), Kubernetes
# labels and MLflow names, so they are kept short.
MAX_EXPERIMENT_NAME = 40
MAX_SHORT_NAME = 30
SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# Kubernetes label syntax (node selectors, toleration keys): a key is an optional DNS-subdomain
# prefix and '/' and a name; values are at most 63 characters.
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
MAX_LABEL_VALUE = 63
_NOT_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")
# The whole label key in one expression (so the CRD can state it): [DNS prefix '/'] name.
LABEL_KEY = (r"^(?:[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
INT32_MAX = 2**31 - 1  # integers the API server, Jobs and the trainer all hold
# A path in canonical form, written so Python, Rust (pydantic) and Go (the API server) read
# the expression alike: segments joined by single '/', none of them '.' or '..', no control
# characters, no trailing '/'. Two spellings of one directory would be two runs of one training.
_SEGMENT = r"(?:[^/.\x00-\x1f\x7f]|\.[^/.\x00-\x1f\x7f]|\.\.[^/\x00-\x1f\x7f])[^/\x00-\x1f\x7f]*"
PLAIN_PATH = rf"^/?{_SEGMENT}(?:/{_SEGMENT})*$"
_S3_SEGMENT = r"(?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-]|\.\.[A-Za-z0-9._-])[A-Za-z0-9._-]*"
# An image reference as the container runtime parses it: [registry[:port]/]name[:tag][@digest].
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = (r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   rf"(?::[0-9]+)?/)?{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
                   r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")


def _schema_name(max_length: int) -> Any:
    """Name constraints for the CRD schema too, so the API server rejects bad names; the
    friendlier message comes from `dns_label`."""
    return Field(json_schema_extra={"pattern": DNS_LABEL.pattern, "maxLength": max_length})


def _schema_enum(values: tuple[str, ...]) -> Any:
    return Field(json_schema_extra={"enum": list(values), "maxLength": max(map(len, values))})


def _keyed_by(names: tuple[str, ...]) -> Any:
    """A map whose keys are known names, written for the API server as an object with one
    property per name: it then rejects an unknown key as an unknown field, `kubectl explain`
    lists the names, and a CEL rule can reach each entry at a fixed cost."""
    def update(schema: dict[str, Any]) -> None:
        value = schema.pop("additionalProperties")
        schema.pop("maxProperties", None)
        described = "description" in schema  # each entry as the map, under its own name
        schema["properties"] = {name: {**value, "description": f"{name}: {schema['description']}"} if described
                                else value for name in names}
    return Field(json_schema_extra=update)


def _intermediate_name(v: str) -> str:
    return _task_name(v, INTERMEDIATE_TASKS, "intermediate task")


def _target_name(v: str) -> str:
    return _task_name(v, TARGET_TASKS, "target task")


IntermediateTaskName = Annotated[str, AfterValidator(_intermediate_name), _schema_enum(INTERMEDIATE_TASKS)]
TargetTaskName = Annotated[str, AfterValidator(_target_name), _schema_enum(TARGET_TASKS)]


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
MAX_SHOWN = 80  # characters of a bad value quoted in an error
_URI_CREDENTIALS = re.compile(r"//[^/?#@'\"]*@")
_QUERY_CREDENTIALS = re.compile(r"(?i)([?&;][^=&#'\"]*(pass|pwd|token|secret|key|auth|credential|signature)"
                                r"[^=&#'\"]*=)[^&#'\"]*")


# repr of a container stops after a few items and levels: a YAML alias bomb is a small file
# whose full repr is gigabytes.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxtuple = 2, 4, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = MAX_SHOWN


def shown_value(value: Any) -> str:
    """repr(value), cut to MAX_SHOWN characters (a 1 MB name must not make a 1 MB error), with
    the credentials of a URI (`//user:password@`, `?token=…`) masked: errors reach terminals, logs and
    the Experiment's status and events."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(abs(value))) if value.bit_length() < 14_000 else 'thousands of'} digits"
    text = repr(value) if isinstance(value, str) else _SHORT_REPR.repr(value)
    text = _QUERY_CREDENTIALS.sub(r"\1***", _URI_CREDENTIALS.sub("//***@", text))
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN - 1]}…"


def path_part(key: str) -> str:
    """A key as a field path shows it: `.name`, or `['odd key']` for a key that is not a
    plain word (map keys and unknown fields are the user's, and may hold dots, spaces,
    quotes or line breaks)."""
    return f".{key}" if len(key) <= 63 and _PLAIN_KEY.fullmatch(key) else f"[{shown_value(key)}]"


class FieldError(ValueError):
    """A cross-field problem found by a model validator, pinned to the field to fix (pydantic
    would otherwise report it at the model's own path); `more` holds every (path, message)
    when a validator found several."""

    def __init__(self, path: str, message: str, more: list[tuple[str, str]] | None = None):
        self.path = path
        self.more = more or [(path, message)]
        super().__init__(message)


def dns_label(value: str, *, max_length: int = 63) -> str:
    if len(value) > max_length or not DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{shown_value(value)} is not a valid name: use at most {max_length} lowercase letters, digits"
            " and '-', starting and ending with a letter or digit (DNS-1123 label), e.g. 'xlmr-large'"
        )
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True,
        # No coercion: '8', 2.0 and true are not integers to the API server, so not to us either.
        strict=True,
        # The string under a field is its description: in the CRD, so `kubectl explain` reads it.
        use_attribute_docstrings=True,
    )


# --- models and resources ---------------------------------------------------------------

# Parameter counts of the models a user is most likely to name, for GPU-hour estimates and
# ZeRO `auto` when the spec gives none.
KNOWN_PARAMETERS = {
    "FacebookAI/xlm-roberta-base": 278_000_000,
    "FacebookAI/xlm-roberta-large": 560_000_000,
    "facebook/xlm-roberta-xl": 3_480_000_000,
    "facebook/xlm-roberta-xxl": 10_700_000_000,
}


def _int_or_string(v: Any) -> Any:
    """What an int-or-string field of the API server takes: an integer or a string, no
    bool, no float (which a Literal would otherwise compare equal to 1 or 3)."""
    if type(v) not in (int, str):
        raise ValueError(f"must be an integer or a string, not {type(v).__name__}")
    return v


class ModelResources(_Spec):
    """Per-model resources. `zeroStage: auto` picks the least partitioned ZeRO stage whose
    model states (16 bytes per parameter for mixed-precision Adam) fit the GPUs."""

    # strict: 2.0, '1' and true are typos, not GPU counts
    gpus: Annotated[int, Field(ge=0, le=16, strict=True, description="GPUs per node (0: CPU)")] = 1
    nodes: Annotated[int, Field(ge=1, le=512, strict=True)] = 1
    """nodes per run; more than 1 needs gpus >= 1"""
    processes_per_node: Annotated[int | None, Field(ge=1, le=64)] = None
    """training processes per node; on GPU nodes it must equal gpus (default: one per GPU)"""
    gpu_memory_gb: Annotated[float, Field(gt=0, le=1024)] = 80
    """memory of one GPU in GB, for choosing the ZeRO stage (default 80)"""
    zero_stage: Annotated[Literal[0, 1, 2, 3, "auto"], BeforeValidator(_int_or_string)] = "auto"
    """DeepSpeed ZeRO stage: 0, 1, 2, 3 or auto, an integer or a string (default auto: the least
    partitioned stage whose model states fit the GPUs)"""
    offload: OffloadMode = "none"
    """DeepSpeed offload to CPU memory: none, optimizer or all; needs a zeroStage other than auto"""
    micro_batch_size: Annotated[int | None, Field(ge=1, le=4096)] = None
    """examples per GPU per step (default: the batch size spread over the GPUs)"""
    cpu: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")] = "8"
    """CPU request and limit of each pod, in Kubernetes units (8, 500m); above zero"""
    memory: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")] = "64Gi"
    """memory request and limit of each pod, in Kubernetes units (64Gi); above zero"""

    @field_validator("cpu", "memory")
    @classmethod
    def _nonzero(cls, v: str) -> str:
        if not any(c in "123456789" for c in v.rstrip("mKMGTi")):
            raise ValueError("must be above zero: a zero request gives the pod no guaranteed resources")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelResources:
        if self.nodes > 1 and self.gpus == 0:
            raise FieldError("nodes", "nodes > 1 needs gpus >= 1: multi-node CPU runs are not supported")
        if self.gpus and self.processes_per_node not in (None, self.gpus):
            raise FieldError("processesPerNode", f"processesPerNode must equal gpus ({self.gpus}) on GPU nodes")
        if self.zero_stage != "auto":
            try:
                DeepSpeedSettings(zero_stage=self.zero_stage, offload=self.offload)
            except ValidationError as e:
                raise FieldError("offload", e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        elif self.offload != "none":
            raise FieldError("offload",
                             "offload is chosen by zeroStage 'auto'; set a zeroStage to choose offload yourself")
        return self

    @property
    def world_size(self) -> int:
        return (self.processes_per_node or max(self.gpus, 1)) * self.nodes


class ModelSpec(_Spec):
    name: Annotated[str, _schema_name(MAX_SHORT_NAME),
                    Field(description="short DNS-1123 name used in run names and labels")]
    pretrained: Annotated[str, Field(min_length=1, max_length=512, pattern=PLAIN_PATH,
                                     description="hub id or local directory of the pretrained encoder")]
    display_name: str | None = None
    """name shown in reports (default: name)"""
    parameters: Annotated[int | None, Field(ge=1, le=10**13)] = None
    """parameter count, for GPU-hour estimates and zeroStage auto (default: known for the XLM-R family)"""
    resources: ModelResources = ModelResources()
    """GPUs, nodes, ZeRO stage and pod resources of this model's runs"""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns_label(v, max_length=MAX_SHORT_NAME)

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: str) -> str:
        if ".." in PurePosixPath(v).parts or CONTROL_CHARACTERS & set(v):
            raise ValueError(f"{shown_value(v)} is not a hub id or a plain path (no '..', no control characters)")
        return v

    @property
    def parameter_count(self) -> int | None:
        return self.parameters or KNOWN_PARAMETERS.get(self.pretrained)

    @property
    def label(self) -> str:
        return self.display_name or self.name

    @model_validator(mode="after")
    def _fits(self) -> ModelSpec:
        r = self.resources
        if r.zero_stage == "auto" and r.gpus > 0:
            if self.parameter_count is None:
                raise FieldError("parameters",
                    f"resources.zeroStage 'auto' needs the parameter count of {shown_value(self.pretrained)}:"
                    " set parameters (e.g. 560000000) or a zeroStage of 0-3"
                )
            try:
                choose_deepspeed(self.parameter_count, r.gpu_memory_gb, r.world_size)
            except ValueError as e:
                raise FieldError("resources", str(e)) from None
        return self

    def deepspeed(self) -> DeepSpeedSettings:
        r = self.resources
        if r.zero_stage != "auto":
            return DeepSpeedSettings(zero_stage=r.zero_stage, offload=r.offload)
        if r.gpus == 0 or self.parameter_count is None:
            return DeepSpeedSettings()  # CPU: no memory pressure worth partitioning for
        return choose_deepspeed(self.parameter_count, r.gpu_memory_gb, r.world_size)


# --- tasks ------------------------------------------------------------------------------


def _task_name(v: str, allowed: tuple[str, ...], what: str) -> str:
    if v not in allowed:
        hint = f" ({v!r} is a {'target' if v in TARGET_TASKS else 'intermediate'} task)" if v in TASKS else ""
        raise ValueError(f"unknown {what} {shown_value(v)}{hint}; valid: {', '.join(allowed)}")
    return v


# A language of translated training data: an ISO 639 code, optionally with a region or script
# (pt-BR, zh-Hans); it names a directory under the task's `data:` entry.
LANGUAGE_CODE = r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$"
MAX_TRANSLATIONS = 64
_ENGLISH_ALWAYS = "lists 'en': English is always trained on; list only the translations' languages"


class MlmSpec(_Spec):
    """Continued multilingual masked-language modelling during intermediate training (Phang et
    al. 2020's first variant): a share of the optimiser steps trains the pretrained model's MLM
    objective on a multilingual text corpus instead of the English task."""

    ratio: Annotated[float, Field(gt=0, lt=1)]
    """share of the optimiser steps that are MLM steps, above 0 and below 1 (e.g. 0.2); the task
    keeps its epochs, so the run takes 1 / (1 - ratio) times the steps"""
    corpus: Annotated[str, Field(min_length=1, max_length=1024, pattern=PLAIN_PATH)]
    """the multilingual text, as the run's pod sees it: a .txt file (one text per line), a .jsonl
    file (objects with a "text" field), or a directory of such files (all of them are read)"""


class MultiTaskGroup(_Spec):
    """A named intermediate arm: several intermediate tasks trained at once (one encoder, one
    head per task), or one or more tasks with a variant (mlm, translateTrain)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "size(self.tasks) >= 2 || has(self.mlm) || has(self.translateTrain)",
        "message": "a group of one task needs a variant (mlm or translateTrain); else list the task in"
                   " intermediateTasks"}]})

    name: Annotated[str, _schema_name(MAX_SHORT_NAME)]
    """short DNS-1123 name of the group, its intermediate arm in run names; not 'baseline' nor an
    intermediate task"""
    tasks: Annotated[list[IntermediateTaskName], Field(min_length=1, max_length=len(INTERMEDIATE_TASKS)), _LIST_SET]
    """the intermediate tasks trained together, each once: at least two, or one with a variant"""
    sampling_temperature: Annotated[float | None, Field(ge=1, le=100)] = None
    """temperature of the size-proportional task sampling, 1 to 100 (1: proportional to size)"""
    mlm: MlmSpec | None = None
    """variant: continued multilingual MLM on a text corpus, mixed with the tasks at a ratio of steps"""
    translate_train: Annotated[list[Annotated[str, Field(pattern=LANGUAGE_CODE, max_length=12)]] | None,
                               Field(min_length=1, max_length=MAX_TRANSLATIONS, json_schema_extra={
                                   "x-kubernetes-list-type": "set", "x-kubernetes-validations": [{
                                       "rule": "!('en' in self)", "message": _ENGLISH_ALWAYS}]})] = None
    """variant (translate-train): languages besides English whose translation of each task's
    training data is trained on too, read from <data.TASK>/<language>/train.jsonl"""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == BASELINE:
            raise ValueError("'baseline' is reserved: the no-intermediate baseline is always included")
        return dns_label(v, max_length=MAX_SHORT_NAME)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"tasks {v} list a task twice; list each task once")
        return v

    @field_validator("translate_train")
    @classmethod
    def _translations(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if "en" in v:
                raise ValueError(_ENGLISH_ALWAYS)
            _no_duplicates(v, "language")
        return v

    @model_validator(mode="after")
    def _arm(self) -> MultiTaskGroup:
        if len(self.tasks) < 2 and not self.variant:
            raise FieldError("tasks", f"one task ({self.tasks[0]}) without a variant trains what intermediateTasks"
                             " does: list it there, list two or more tasks, or add mlm or translateTrain")
        return self

    @property
    def variant(self) -> str | None:
        """The variants this arm uses, for labels and tags ('mlm', 'translate-train', both with '+')."""
        names = [name for name, on in (("mlm", self.mlm), ("translate-train", self.translate_train)) if on]
        return "+".join(names) or None

    def training_key(self) -> tuple[object, ...]:
        """What the arm trains: two arms with the same key would train the same runs."""
        return (frozenset(self.tasks), self.mlm, tuple(sorted(self.translate_train or ())))


class HyperParameterOverrides(_Spec):
    """A partial set of hyper-parameters: only the fields given replace the defaults."""

    learning_rate: Annotated[float | None, Field(gt=0, le=1)] = None
    """peak learning rate of AdamW"""
    batch_size: Annotated[int | None, Field(ge=1, le=65536)] = None
    """examples per optimiser step, over all GPUs"""
    epochs: Annotated[float | None, Field(gt=0, le=1000)] = None
    """passes over the training data (may be fractional)"""
    max_steps: Annotated[int | None, Field(ge=1, le=INT32_MAX)] = None
    """optimiser steps at most; ends training before epochs do"""
    max_seq_length: Annotated[int | None, Field(ge=8, le=8192)] = None
    """tokens per example at most (default: the task's)"""
    warmup_ratio: Annotated[float | None, Field(ge=0, lt=1)] = None
    """fraction of the steps with a linear learning-rate warm-up, 0 to below 1"""
    weight_decay: Annotated[float | None, Field(ge=0, le=1)] = None
    """AdamW weight decay, 0 to 1"""
    max_train_examples: Annotated[int | None, Field(ge=1, le=INT32_MAX)] = None
    """training examples used at most (a subsample, for quick runs)"""
    max_eval_examples: Annotated[int | None, Field(ge=1, le=INT32_MAX)] = None
    """evaluation examples used at most"""
    sampling_temperature: Annotated[float | None, Field(ge=1, le=100)] = None
    """temperature of multi-task sampling, 1 to 100"""
    retrieval_layer: Annotated[int | None, Field(ge=0, le=1000)] = None
    """encoder layer whose representations retrieval tasks (bucc2018, tatoeba) compare"""

    def apply(self, base: HyperParameters) -> HyperParameters:
        changes = self.model_dump(exclude_none=True, by_alias=False)
        return base.model_copy(update=changes) if changes else base


# Stage defaults sit under the spec's own stage settings; max sequence length comes from the
# task (SQuAD needs 384 tokens, NLI 128). Target defaults follow the XTREME XNLI/PAWS-X scripts.
STAGE_DEFAULTS = {
    "intermediate": HyperParameterOverrides(learning_rate=1e-5, batch_size=32, epochs=2, warmup_ratio=0.1),
    "target": HyperParameterOverrides(learning_rate=2e-5, batch_size=32, epochs=5, warmup_ratio=0.1),
}


MAX_SEARCH_VALUES = 16


class SearchSpec(_Spec):
    """Values to search for a stage: each becomes its own runs (its own run ids), and the one
    whose runs score best on the English dev set, averaged over seeds, is selected per model
    and intermediate arm (and per target at the target stage). A searched value replaces the
    one the stage, model or task settings give."""

    learning_rate: Annotated[list[Annotated[float, Field(gt=0, le=1)]],
                             Field(min_length=2, max_length=MAX_SEARCH_VALUES,
                                   json_schema_extra={"x-kubernetes-list-type": "set"})]
    """learning rates to try, 2 to 16, each once; the best on English dev is selected"""

    @field_validator("learning_rate")
    @classmethod
    def _distinct(cls, v: list[float]) -> list[float]:
        _no_duplicates(v, "learning rate")
        return v


MAX_MODELS = 64  # models of one experiment (and so per-model entries)


class StageHyperParameters(HyperParameterOverrides):
    """A stage's settings, its settings for one model, and optionally the values to search
    for it."""

    per_model: Annotated[dict[str, HyperParameterOverrides], Field(max_length=MAX_MODELS)] = Field(
        default_factory=dict)
    """this stage's settings of one model's runs, keyed by model name (over hyperparameters.perModel)"""
    search: SearchSpec | None = None
    """values to search for this stage, each run as its own runs"""

    def apply(self, base: HyperParameters) -> HyperParameters:
        changes = self.model_dump(exclude_none=True, exclude={"search", "per_model"}, by_alias=False)
        return base.model_copy(update=changes) if changes else base

    @property
    def learning_rates(self) -> tuple[float, ...]:
        """The searched learning rates; empty without a search."""
        return () if self.search is None else tuple(self.search.learning_rate)


class HyperParameterSpec(_Spec):
    """Built-in stage defaults, then these stage settings, then per model, then the stage's
    per model, then per task: the most specific wins. A stage's `search` values replace all
    of them."""

    intermediate: StageHyperParameters = StageHyperParameters()
    """settings of every phase-2 (intermediate-task) run"""
    target: StageHyperParameters = StageHyperParameters()
    """settings of every phase-3 (target-task) run"""
    per_model: Annotated[dict[str, HyperParameterOverrides], Field(max_length=MAX_MODELS)] = Field(
        default_factory=dict)
    """settings of one model's runs in both stages, keyed by model name"""
    per_task: Annotated[dict[str, HyperParameterOverrides], Field(max_length=len(TASKS)), _keyed_by(tuple(TASKS))] = (
        Field(default_factory=dict))
    """settings of one task's runs, keyed by task"""

    @field_validator("per_task")
    @classmethod
    def _known_tasks(cls, v: dict[str, HyperParameterOverrides]) -> dict[str, HyperParameterOverrides]:
        for t in v:
            try:
                _task_name(t, tuple(TASKS), "task")
            except ValueError as e:
                raise FieldError(path_part(t).removeprefix("."), str(e)) from None
        return v


# --- cluster ----------------------------------------------------------------------------


def label_key(key: str) -> str:
    if not re.fullmatch(LABEL_KEY, key):
        raise ValueError(f"{shown_value(key)} is not a label key: an optional DNS prefix and '/', then at most 63"
                         " letters, digits, '-', '_' or '.', e.g. 'nvidia.com/gpu.product'")
    return key


def check_label_value(value: str) -> str:
    """`value` unchanged if it is a valid label value (a spec's node selector, a toleration),
    else ValueError saying what one is. `clean_label_value` makes one of any text instead."""
    if len(value) > MAX_LABEL_VALUE or not LABEL_VALUE.fullmatch(value):
        raise ValueError(f"{shown_value(value)} is not a label value: at most 63 letters, digits, '-', '_' or '.',"
                         " starting and ending with a letter or digit")
    return value


def clean_label_value(value: str) -> str:
    """A valid label value made of any text (names xstilts puts on the objects it renders): at
    most 63 characters of [A-Za-z0-9._-], starting and ending with a letter or digit (empty if
    nothing is left)."""
    cleaned = _NOT_LABEL_VALUE.sub("-", value)[:MAX_LABEL_VALUE]
    return cleaned.strip("-._")
_LABEL_VALUE_SCHEMA = Field(json_schema_extra={"pattern": f"^{LABEL_VALUE.pattern}$", "maxLength": 63})


# A pod toleration, checked by the rules the API server applies to one, so that a spec the CLI
# accepts never renders a Job the API server rejects.
class Toleration(_Spec):
    key: Annotated[str | None, Field(pattern=LABEL_KEY, max_length=317)] = None
    """the taint key the toleration matches (empty with operator Exists: every taint)"""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal (key and value match) or Exists (the key matches)"""
    value: Annotated[str | None, _LABEL_VALUE_SCHEMA] = None
    """the taint value, with operator Equal"""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """the taint effect matched: NoSchedule, PreferNoSchedule or NoExecute (empty: all)"""
    toleration_seconds: Annotated[int | None, Field(ge=0, le=INT32_MAX)] = None
    """how long a pod stays bound after a NoExecute taint appears"""

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return None if v is None else label_key(v)

    @field_validator("value")
    @classmethod
    def _value(cls, v: str | None) -> str | None:
        return None if v is None else check_label_value(v)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise FieldError("value", "operator 'Exists' takes no value; drop value or use operator 'Equal'")
        if self.operator == "Equal" and not self.key:
            raise FieldError("key", "operator 'Equal' needs a key; give key, or operator 'Exists' to tolerate all")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise FieldError("tolerationSeconds", "tolerationSeconds applies only to effect 'NoExecute'")
        return self


# Top-level directories of a run pod that the runs volume must not be mounted over: the
# trainer image's own files (its Python lives in /opt), the run config at /etc/xstilts, and
# the /tmp and /dev/shm volumes render mounts itself (the API server rejects a second mount at
# one path; a mount over the image's files breaks it).
POD_SYSTEM_DIRS = ("bin", "boot", "dev", "etc", "lib", "lib64", "opt", "proc", "root", "run", "sbin", "sys", "tmp",
                   "usr", "var")


_SYSTEM_MOUNT = rf"^/({'|'.join(POD_SYSTEM_DIRS)})(/|$)"
_SYSTEM_MOUNT_MESSAGE = ("would hide or clash with the pod's own files; mount the runs volume at a directory of its"
                         " own, such as /data or /mnt/runs")
# Run directories live on a mounted volume only: the trainer and the controller read and write
# them as local paths, so an object-store URI would land in a relative directory of the pod and
# be lost (docs/decisions/no-object-storage-yet.md). Refused here and, the same words, by the CRD.
OBJECT_STORAGE_REFUSED = ("object storage is not supported yet (results and checkpoints would not reach it);"
                          " drop cluster.storage.uri and use cluster.storage.pvc with a ReadWriteMany"
                          " PersistentVolumeClaim, e.g. storage: {pvc: xstilts-runs, mountPath: /data}")
_NO_URI: dict[str, Any] = {"rule": "!has(self.uri)", "fieldPath": ".uri", "message": OBJECT_STORAGE_REFUSED}


class StorageSpec(_Spec):
    """Where checkpoints and results live in the cluster: a PersistentVolumeClaim mounted
    into every pod. `uri` (object storage) is refused until run directories can live there."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [_NO_URI]})

    pvc: Annotated[str | None, _schema_name(253)] = None
    """name of a ReadWriteMany PersistentVolumeClaim in the namespace, mounted into every run's pod"""
    mount_path: Annotated[str, Field(
        pattern=rf"^(?:/{_S3_SEGMENT})+$", max_length=256,
        json_schema_extra={"x-kubernetes-validations": [{"rule": f"!self.matches('{_SYSTEM_MOUNT}')",
                                                          "message": _SYSTEM_MOUNT_MESSAGE}]})] = "/data"
    """where the claim is mounted in the pod (default /data); not over the pod's system directories"""
    uri: Annotated[str | None, Field(max_length=1024)] = None
    """object storage: not supported yet, refused; use pvc"""

    @field_validator("pvc")
    @classmethod
    def _pvc(cls, v: str | None) -> str | None:
        return None if v is None else dns_label(v, max_length=253)

    @field_validator("mount_path")
    @classmethod
    def _own_directory(cls, v: str) -> str:
        if re.search(_SYSTEM_MOUNT, v):
            raise ValueError(f"{shown_value(v)}: {_SYSTEM_MOUNT_MESSAGE}")
        return v

    @field_validator("uri")
    @classmethod
    def _no_object_storage(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError(OBJECT_STORAGE_REFUSED)
        return v


# What each Secret reference holds, for the message that sends a pasted value to the right field.
SECRET_HOLDS = {
    "hfToken": "the key HF_TOKEN",
    "mlflow": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN",
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
}


def _secret_name() -> Any:
    return Field(json_schema_extra={"pattern": SECRET_NAME.pattern, "maxLength": 253},
                 description="name of a Secret in the Experiment's namespace (never the value itself)")


class SecretRefs(_Spec):
    """Names of Secrets in the Experiment's namespace; never their values."""

    hf_token: Annotated[str | None, _secret_name()] = None
    mlflow: Annotated[str | None, _secret_name()] = None
    s3: Annotated[str | None, _secret_name()] = None

    @field_validator("hf_token", "mlflow", "s3")
    @classmethod
    def _name(cls, v: str | None, info: Any) -> str | None:
        if v is not None and (len(v) > 253 or not SECRET_NAME.fullmatch(v)):
            field = to_camel(info.field_name)
            raise ValueError(  # without the value: what is not a name may be the secret itself
                f"not a Secret name (lowercase DNS-1123 subdomain): never paste a credential into the spec; put it"
                f" into a Secret ({SECRET_HOLDS[field]}) and give that Secret's name here")
        return v


class ClusterSpec(_Spec):
    namespace: Annotated[str, _schema_name(63)] = "default"
    """the namespace the runs' Jobs are created in"""
    image: Annotated[str, Field(pattern=IMAGE_REFERENCE, max_length=512)] = (
        "ghcr.io/xstilts/trainer:0.1.0"
    )
    """the trainer image every run's pod runs"""
    queue: Annotated[str | None, _schema_name(63)] = None  # Kueue LocalQueue name
    """the Kueue LocalQueue the Jobs are submitted to (none: no Kueue)"""
    node_selector: Annotated[dict[str, Annotated[str, _LABEL_VALUE_SCHEMA]], Field(max_length=32, json_schema_extra={
            "x-kubernetes-validations": [{"rule": f"self.all(k, k.matches('{LABEL_KEY}'))",
                                          "message": "a key is not a label key"}]})] = Field(default_factory=dict)
    """node labels every run's pod must match, e.g. nvidia.com/gpu.product: H100"""
    tolerations: list[Toleration] = Field(default_factory=list)
    """taints every run's pod tolerates"""
    storage: StorageSpec = StorageSpec()
    """where run directories (checkpoints, results) live"""
    secrets: SecretRefs = SecretRefs()
    """Secrets the runs read credentials from, by name"""
    max_parallel: Annotated[int, Field(ge=1, le=10000)] = 8
    """runs active at once at most, 1 to 10000 (default 8)"""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """pod retries of a run's Job before the run fails (default 3)"""
    active_deadline_seconds: Annotated[int | None, Field(ge=60, le=INT32_MAX)] = None
    """a run's Job fails after this many seconds (none: no limit)"""
    ttl_seconds_after_finished: Annotated[int | None, Field(ge=0, le=INT32_MAX)] = 86400
    """a finished Job is deleted after this many seconds (default one day; its results stay)"""

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return dns_label(v)

    @field_validator("node_selector")
    @classmethod
    def _node_labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            label_key(key)
            check_label_value(value)
        return v

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        return None if v is None else dns_label(v)


# Credentials travel only by Secret reference. A URI is rendered into every Job's env and
# RUN.json and shown by `plan`, so one with a user part (`token@`, `user:password@`) or a
# credential-shaped query parameter is refused, here and (the same expressions, RE2 and
# Python agree on them) by the CRD's CEL rules.
URI_USERINFO = r"^[A-Za-z][A-Za-z0-9+.-]*:/*[^/?#]*@"
URI_SECRET_QUERY = r"(?i)[?&;][^=&#]*(pass|pwd|token|secret|key|auth|credential|signature)[^=&#]*="
_MLFLOW_SECRET = ("put the credentials into a Secret (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or"
                  " MLFLOW_TRACKING_TOKEN) and name it in cluster.secrets.mlflow")
_URI_RULES = [
    {"rule": f"!self.matches('{URI_USERINFO}')",
     "message": f"holds credentials in its user part (user@ or user:password@); {_MLFLOW_SECRET}"},
    {"rule": f"!self.matches('{URI_SECRET_QUERY}')",
     "message": f"holds a credential in its query; {_MLFLOW_SECRET}"},
]


def uri_credential_problem(uri: str) -> str | None:
    """What the CRD's rules on a URI say about it, or None when it holds no credential."""
    for rule, expression in zip(_URI_RULES, (URI_USERINFO, URI_SECRET_QUERY), strict=True):
        if re.search(expression, uri):
            return rule["message"]
    return None


class MlflowSpec(_Spec):
    tracking_uri: Annotated[str | None, Field(
        pattern=r"^(https?|file|sqlite|postgresql|databricks)[:+][^\x00-\x20\x7f]*$", max_length=2048,
        description="MLflow tracking server; credentials go into the Secret cluster.secrets.mlflow, never here",
        json_schema_extra={"x-kubernetes-validations": _URI_RULES})] = None
    experiment_name: str | None = None  # default: the experiment's name
    """the MLflow experiment the runs log to (default: the experiment's name)"""

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        problem = None if v is None else uri_credential_problem(v)
        if problem:
            raise ValueError(problem)
        return v


# The most runs one Experiment may plan. A planned run holds about 2.5 kB (RunConfig, labels,
# estimate); 20,000 runs plan in about 2 s and 50 MB, which the controller (1 GiB) can hold
# for several such Experiments at once (benchmarks/plan_scale.py measures it).
MAX_RUNS = 20_000


class PlanningSpec(_Spec):
    """Assumptions of the GPU-hour estimate, and a guard against accidental huge grids."""

    # Sustained model FLOP/s per GPU (bf16), i.e. peak × utilisation.
    assumed_tflops_per_gpu: Annotated[float, Field(gt=0, le=10000)] = 300.0
    """sustained bf16 TFLOP/s per GPU (peak x utilisation) for GPU-hour estimates (default 300)"""
    max_runs: Annotated[int, Field(ge=1, le=MAX_RUNS)] = 2000
    """a grid with more runs is refused, 1 to 20000 (default 2000); with replication every cell counts at maxSeeds"""


class ReplicationSpec(_Spec):
    """Precision-driven replication: each cell (model × intermediate arm × target) starts with
    seeds 1..minSeeds; while its paired gain interval (95%, in points, on the zero-shot
    average) is wider than ±targetHalfWidth once its runs have finished, reconcile adds the
    next seed (a baseline and an intermediate-arm run with it), up to maxSeeds. With
    `unit: modelAverage` the unit is a model × arm instead, judged on its gain averaged over
    the targets (the report's per-model headline), and a seed is added to every target."""

    target_half_width: Annotated[float, Field(gt=0, le=100)]
    """half-width of the 95% paired gain interval, in points, at which a cell stops adding seeds"""
    min_seeds: Annotated[int, Field(ge=2, le=1000)] = 3  # two paired seeds give the first interval
    """seeds every cell starts with, at least 2 (default 3)"""
    max_seeds: Annotated[int, Field(ge=2, le=1000)] = 10
    """seeds a cell runs at most (default 10)"""
    unit: Literal["cell", "modelAverage"] = "cell"
    """what must reach the precision: each cell (default), or each model × arm over the targets (modelAverage)"""

    @model_validator(mode="after")
    def _bounds(self) -> ReplicationSpec:
        if self.max_seeds < self.min_seeds:
            raise FieldError("maxSeeds", f"maxSeeds ({self.max_seeds}) must be at least minSeeds ({self.min_seeds})")
        return self


# --- the experiment ---------------------------------------------------------------------


MAX_GROUPS = 16
# Lists the API server checks for repeated items itself: scalars as a set, objects keyed by name.
_LIST_SET = Field(json_schema_extra={"x-kubernetes-list-type": "set"})
_LIST_MAP = Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})


def grid_rules() -> list[dict[str, str]]:
    """grid_problems as CEL rules on the spec, for the API server. Optional fields are absent
    (the CRD sets no defaults), hence the has() guards; maps keyed by task are objects there
    (`_keyed_by`), so each task's entry is a field."""
    # (No `has(x) ? x : []`: the cost estimate loses the list's maxItems through it.)
    groups = "!has(self.multiTaskGroups) || self.multiTaskGroups"

    def used(task: str) -> str:
        return (f"((has(self.intermediateTasks) && '{task}' in self.intermediateTasks) || '{task}' in self.targets"
                f" || (has(self.multiTaskGroups) && self.multiTaskGroups.exists(g, '{task}' in g.tasks)))")

    def per_model_names(at: str) -> tuple[str, str]:  # `at`: the path of a perModel map in the spec
        parts = at.split(".")
        present = " && ".join(f"has(self.{'.'.join(parts[:i])})" for i in range(1, len(parts) + 1))
        return (f"!({present}) || self.models.filter(m, m.name in self.{at}).size() == size(self.{at})",
                f"{at}: names a model that is not in models")
    # With replication every cell may reach maxSeeds: counted as run_count counts it.
    default_max_seeds = ReplicationSpec.model_fields["max_seeds"].default
    max_seeds = f"(has(self.replication.maxSeeds) ? self.replication.maxSeeds : {default_max_seeds})"
    seeds = f"(has(self.replication) ? {max_seeds} : has(self.seeds) ? size(self.seeds) : 1)"
    arms = ("((has(self.intermediateTasks) ? size(self.intermediateTasks) : 0)"
            " + (has(self.multiTaskGroups) ? size(self.multiTaskGroups) : 0))")
    def searched(stage: str) -> str:
        return (f"(has(self.hyperparameters) && has(self.hyperparameters.{stage})"
                f" && has(self.hyperparameters.{stage}.search))")

    def rates(stage: str) -> str:  # a search's runs per cell: one per rate
        return f"({searched(stage)} ? size(self.hyperparameters.{stage}.search.learningRate) : 1)"

    runs = (f"(size(self.models) * {arms} * {seeds} * {rates('intermediate')}"
            f" + size(self.models) * ({arms} + 1) * size(self.targets) * {seeds} * {rates('target')})")
    max_runs = f"(has(self.planning) && has(self.planning.maxRuns) ? self.planning.maxRuns : {PlanningSpec().max_runs})"
    rules = [
        ("self.models.all(m, self.models.exists_one(n, n.pretrained == m.pretrained))",
         "models: list each pretrained model once"),
        # Arms with a variant may share tasks (their variants differ, which grid_problems checks).
        (f"{groups}.all(g, has(g.mlm) || has(g.translateTrain) || self.multiTaskGroups.exists_one(h,"
         " !has(h.mlm) && !has(h.translateTrain) && size(h.tasks) == size(g.tasks) && h.tasks.all(t, t in g.tasks)))",
         "multiTaskGroups: two groups train the same tasks; keep one of them"),
        (f"!has(self.intermediateTasks) || {groups}.all(g, !(g.name in self.intermediateTasks))",
         "multiTaskGroups: a group name clashes with an intermediate task"),
        per_model_names("hyperparameters.perModel"),
        per_model_names("hyperparameters.intermediate.perModel"),
        per_model_names("hyperparameters.target.perModel"),
        (f"{runs} <= {max_runs}", "the grid has more runs than planning.maxRuns"),
        ("!has(self.replication) || !has(self.seeds)",
         "replication: cannot be combined with seeds; remove one of them"),
        (f"!has(self.replication) || !({searched('intermediate')} || {searched('target')})",
         "hyperparameters: a learning-rate search cannot be combined with replication yet; remove one of them"),
    ]
    for task, info in TASKS.items():
        rules.append((f"!has(self.data) || !has(self.data.{task}) || {used(task)}",
                      f"data.{task}: task '{task}' is not in the grid"))
        rules.append((f"!has(self.hyperparameters) || !has(self.hyperparameters.perTask) ||"
                      f" !has(self.hyperparameters.perTask.{task}) || {used(task)}",
                      f"hyperparameters.perTask.{task}: task '{task}' is not in the grid"))
        if not info.hub:
            rules.append((f"!{used(task)} || (has(self.data) && has(self.data.{task}))",
                          f"data.{task}: task '{task}' has no hub source; give its local data directory"))
        if task in INTERMEDIATE_TASKS:
            rules.append((f"!has(self.multiTaskGroups) || !self.multiTaskGroups.exists(g, has(g.translateTrain)"
                          f" && '{task}' in g.tasks) || (has(self.data) && has(self.data.{task}))",
                          f"data.{task}: translateTrain reads the translations of '{task}' from data.{task};"
                          " give its local data directory"))
    for target in TARGET_TASKS:
        rules.append((f"!has(self.evalLanguages) || !has(self.evalLanguages.{target}) || ('{target}' in self.targets"
                      f" && self.evalLanguages.{target}.all(l, l in {list(TASKS[target].languages)}))",
                      f"evalLanguages.{target}: {target} must be in targets, and the languages its own"))
    return [{"rule": rule, "message": message} for rule, message in rules]


class ExperimentSpec(_Spec):
    """models × (baseline + intermediate tasks + multi-task groups) × targets × seeds."""

    name: Annotated[str, _schema_name(MAX_EXPERIMENT_NAME)]
    """DNS-1123 name of the experiment; equals metadata.name"""
    model_config = ConfigDict(json_schema_extra=lambda schema: schema.update(
        {"x-kubernetes-validations": grid_rules()}))

    models: Annotated[list[ModelSpec], Field(min_length=1, max_length=MAX_MODELS), _LIST_MAP]
    """the pretrained encoders compared, each listed once"""
    intermediate_tasks: Annotated[list[IntermediateTaskName], Field(max_length=len(INTERMEDIATE_TASKS)),
                                  _LIST_SET] = Field(default_factory=list)
    """phase-2 tasks, each trained on its own before the targets"""
    multi_task_groups: Annotated[list[MultiTaskGroup], Field(max_length=MAX_GROUPS), _LIST_MAP] = Field(
        default_factory=list)
    """named phase-2 arms: several intermediate tasks at once, or tasks with a variant (mlm, translateTrain)"""
    targets: Annotated[list[TargetTaskName], Field(min_length=1, max_length=len(TARGET_TASKS)), _LIST_SET]
    """phase-3 target tasks, evaluated zero-shot across languages"""
    seeds: Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(min_length=1, max_length=MAX_RUNS),
                     _LIST_SET] = [1]
    """the seeds every cell runs (default [1]); not with replication"""
    replication: ReplicationSpec | None = None  # instead of seeds: as many seeds as precision needs
    """instead of seeds: add seeds to each cell until its gain interval is narrow enough"""
    hyperparameters: HyperParameterSpec = HyperParameterSpec()
    """hyper-parameters per stage, model and task; the most specific wins"""
    eval_languages: Annotated[dict[str, Annotated[list[str], Field(min_length=1, max_length=64), _LIST_SET]],
                              Field(max_length=len(TARGET_TASKS)), _keyed_by(TARGET_TASKS)] = Field(
        default_factory=dict)  # target -> subset
    """per target task, the languages evaluated (default: all of the task's)"""
    data: Annotated[dict[str, Annotated[str, Field(pattern=PLAIN_PATH, max_length=1024)]],
                    Field(max_length=len(TASKS)), _keyed_by(tuple(TASKS))] = Field(
        default_factory=dict)  # task -> local data directory
    """per task, a local data directory instead of the hub (required for tasks with no hub source, such as ccg)"""
    cluster: ClusterSpec = ClusterSpec()
    """how and where the runs execute on Kubernetes"""
    mlflow: MlflowSpec = MlflowSpec()
    """where the runs log metrics"""
    planning: PlanningSpec = PlanningSpec()
    """GPU-hour estimate assumptions and the runs limit"""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return dns_label(v, max_length=MAX_EXPERIMENT_NAME)

    @field_validator("intermediate_tasks")
    @classmethod
    def _intermediate(cls, v: list[str]) -> list[str]:
        _no_duplicates(v, "intermediate task")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        _no_duplicates(v, "target")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        _no_duplicates(v, "seed")
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: dict[str, str]) -> dict[str, str]:
        for task in v:
            try:
                _task_name(task, tuple(TASKS), "task")
            except ValueError as e:
                raise FieldError(path_part(task).removeprefix("."), str(e)) from None
        return v

    @model_validator(mode="after")
    def _grid(self, info: ValidationInfo) -> ExperimentSpec:
        if not (info.context or {}).get("fields_only"):
            problems = grid_problems(self)
            if problems:
                raise FieldError(problems[0][0], problems[0][1], [(path, message) for path, message, _ in problems])
        return self

    @property
    def intermediates(self) -> list[str]:
        """Every intermediate arm except the baseline: single tasks, then groups."""
        return [*self.intermediate_tasks, *(g.name for g in self.multi_task_groups)]

    @property
    def initial_seeds(self) -> list[int]:
        """The seeds every cell runs: the fixed list, or 1..minSeeds under replication."""
        return self.seeds if self.replication is None else list(range(1, self.replication.min_seeds + 1))

    @property
    def all_seeds(self) -> list[int]:
        """Every seed a cell may run: the fixed list, or 1..maxSeeds under replication."""
        return self.seeds if self.replication is None else list(range(1, self.replication.max_seeds + 1))

    @property
    def run_count(self) -> int:
        """Runs at most (with replication: every cell at maxSeeds), for the planning.maxRuns guard."""
        n_models, n_seeds = len(self.models), len(self.all_seeds)
        # A phase-2 search trains every candidate; reconcile starts target runs from the selected one.
        n_intermediate = max(1, len(self.hyperparameters.intermediate.learning_rates))
        n_target = max(1, len(self.hyperparameters.target.learning_rates))
        phase2 = n_models * len(self.intermediates) * n_seeds * n_intermediate
        phase3 = n_models * (len(self.intermediates) + 1) * len(self.targets) * n_seeds * n_target
        return phase2 + phase3

    def group(self, name: str) -> MultiTaskGroup | None:
        return next((g for g in self.multi_task_groups if g.name == name), None)


def _no_duplicates(values: list[Any], what: str, path: str | None = None) -> None:
    # Linear: a list of a million seeds must be rejected by planning.maxRuns in a second, not
    # stall validation (the controller's reconcile loop included) in a quadratic scan.
    seen: set[Any] = set()
    for v in values:
        if v in seen:
            message = f"duplicate {what} {shown_value(v)}; list each {what} once"
            raise FieldError(path, message) if path else ValueError(message)
        seen.add(v)


def _duplicates(values: list[Any]) -> list[Any]:
    # Linear: a list of a million seeds must be rejected in a second, not stall validation
    # (the controller's reconcile loop included) in a quadratic scan.
    seen: set[Any] = set()
    repeated = []
    for v in values:
        if v in seen:
            repeated.append(v)
        seen.add(v)
    return repeated


Problem = tuple[str, str, frozenset[str]]  # field path, message, the top-level fields it reads


def grid_problems(spec: ExperimentSpec) -> list[Problem]:
    """Every cross-field problem of a spec, each with the top-level fields it depends on (so
    that, when some of those fields are themselves invalid, it can be left out rather than
    reported against a stand-in value). The CRD states the same rules in CEL (crd.py)."""
    out: list[Problem] = []

    def problem(path: str, message: str, *fields: str) -> None:
        out.append((path, message, frozenset(fields)))

    for name in _duplicates([m.name for m in spec.models]):
        problem("models", f"duplicate model name {shown_value(name)}; list each model once", "models")
    # Run ids hash what determines a result, so one checkpoint listed twice would be one run.
    for pretrained in _duplicates([m.pretrained for m in spec.models]):
        problem("models", f"duplicate pretrained model {shown_value(pretrained)}; list each model once", "models")
    for name in _duplicates([g.name for g in spec.multi_task_groups]):
        problem("multiTaskGroups", f"duplicate multi-task group name {shown_value(name)}; name each group once",
                "multiTaskGroups")
    # The tasks of a group are a set: [mnli, qqp] and [qqp, mnli] are one training.
    for key in _duplicates([g.training_key() for g in spec.multi_task_groups]):
        tasks = sorted(key[0])
        problem("multiTaskGroups", f"two groups train the same tasks {tasks} with the same variants; keep one of"
                " them", "multiTaskGroups")
    clash = set(spec.intermediate_tasks) & {g.name for g in spec.multi_task_groups}
    if clash:
        problem("multiTaskGroups", f"group names {sorted(clash)} clash with intermediate task names; rename the groups",
                "multiTaskGroups", "intermediateTasks")
    models = [m.name for m in spec.models]
    hp = spec.hyperparameters
    for field, per_model in (("hyperparameters.perModel", hp.per_model),
                             ("hyperparameters.intermediate.perModel", hp.intermediate.per_model),
                             ("hyperparameters.target.perModel", hp.target.per_model)):
        for model in per_model:
            if model not in models:
                problem(f"{field}{path_part(model)}",
                        f"names model {shown_value(model)}, which is not in models ({', '.join(models)})",
                        "hyperparameters", "models")
    used = list(dict.fromkeys([*spec.intermediate_tasks, *(t for g in spec.multi_task_groups for t in g.tasks),
                               *spec.targets]))
    grid = ("intermediateTasks", "multiTaskGroups", "targets")
    for field, names in (("hyperparameters.perTask", spec.hyperparameters.per_task), ("data", spec.data)):
        for task in names:
            if task not in used:
                problem(f"{field}{path_part(task)}", f"task {shown_value(task)} is not in the grid"
                        " (intermediateTasks, multiTaskGroups, targets); remove it or add the task",
                        field.split(".")[0], *grid)
    # A task without a hub source (CCG: its corpus is licensed) reads only `data:`; without
    # that entry it would fail in the pod, after the runs before it had been paid for.
    for task in used:
        if not TASKS[task].hub and task not in spec.data:
            problem(f"data{path_part(task)}", f"task {task!r} has no hub source; give its local data directory here",
                    "data", *grid)
    # Translate-train reads each translation beside the task's English data; without a `data:`
    # entry there is nowhere to read it from (the hub holds no user translation).
    for i, g in enumerate(spec.multi_task_groups):
        for task in g.tasks if g.translate_train else ():
            if task not in spec.data:
                problem(f"data{path_part(task)}", f"multiTaskGroups[{i}] ({g.name}) trains {task!r} with translateTrain"
                        f" {g.translate_train}: give data.{task}, a directory holding train.jsonl and validation.jsonl"
                        " (English) and <language>/train.jsonl for each translation", "data", "multiTaskGroups")
    for target, languages in spec.eval_languages.items():
        if target not in spec.targets:
            problem(f"evalLanguages{path_part(target)}", f"{shown_value(target)} is not one of targets {spec.targets}",
                    "evalLanguages", "targets")
            continue
        valid = TASKS[target].languages
        if any(lang not in valid for lang in languages):
            problem(f"evalLanguages{path_part(target)}",
                    f"{shown_value(languages)} must be a subset of {', '.join(valid)}", "evalLanguages")
    searched = [stage for stage in ("intermediate", "target")
                if getattr(spec.hyperparameters, stage).search is not None]
    if spec.replication is not None and searched:
        problem(f"hyperparameters.{searched[0]}.search", "cannot be combined with replication yet: replication adds"
                " seeds per cell, the search selects among runs of the cell; remove one of them",
                "hyperparameters", "replication")
    if spec.replication is not None and "seeds" in spec.model_fields_set:
        problem("replication", "cannot be combined with seeds: replication picks the seeds itself (1, 2, ... up to"
                " maxSeeds); remove seeds, or remove replication to run a fixed list of seeds", "replication", "seeds")
    runs = spec.run_count
    if runs > spec.planning.max_runs:
        problem("planning.maxRuns",
                f"the grid has {runs} runs, more than planning.maxRuns ({spec.planning.max_runs});"
                + (" shrink the grid or raise planning.maxRuns" if runs <= MAX_RUNS else
                   f" an experiment may have at most {MAX_RUNS:,}: split the grid into several experiments"),
                "planning", "models", "seeds", *grid)
    return out


# --- documents: bare spec or Kubernetes object --------------------------------------------


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    namespace: str | None = None


class ExperimentObject(BaseModel):
    """`kind: Experiment` as `kubectl apply` sends it."""

    model_config = ConfigDict(extra="forbid")
    api_version: Literal["xstilts.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Experiment"]
    metadata: ObjectMeta = ObjectMeta()
    spec: ExperimentSpec
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _names_agree(self) -> ExperimentObject:
        if self.metadata.name and self.metadata.name != self.spec.name:
            raise ValueError(
                f"metadata.name {shown_value(self.metadata.name)} differs from spec.name {self.spec.name!r};"
                " make them equal"
            )
        return self


# Bounds on what a spec may cost to read. A real spec is a few kilobytes and a few hundred
# YAML nodes; these are far above that and far below what would hurt the CLI or the controller.
MAX_SPEC_BYTES = 1024 * 1024  # also about the API server's own limit for one object
MAX_SPEC_NODES = 200_000  # YAML nodes after aliases are expanded (an alias bomb is tiny on disk)
MAX_PROBLEMS = 50  # lines of one SpecError; the rest are counted


class SpecError(Exception):
    """A spec that cannot be used, with one line per problem: `field.path: message (got value)`."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        if len(problems) > MAX_PROBLEMS:  # a list of 100,000 bad seeds is one mistake, not 100,000
            problems = [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS:,} more problems"]
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


# What a pattern means, for the error message (the pattern itself is for machines).
PATTERN_HELP = {
    PLAIN_PATH: "not a plain path: segments joined by single '/', none of them '.' or '..', no control characters,"
                " no trailing '/'",
    IMAGE_REFERENCE: "not an image reference: [registry[:port]/]lowercase/name[:tag][@sha256:digest],"
                     " e.g. 'ghcr.io/xstilts/trainer:0.1.0'",
    SECRET_NAME.pattern: "not a Secret name (lowercase DNS-1123 subdomain)",
    LABEL_KEY: "not a label key: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.',"
               " e.g. 'nvidia.com/gpu.product'",
    DNS_LABEL.pattern: "not a valid name: lowercase letters, digits and '-', starting and ending with a letter or"
                       " digit",
}


def _join(path: str, sub: str) -> str:
    return f"{path}{'' if sub.startswith('[') else '.'}{sub}" if path else sub


def format_errors(error: ValidationError, prefix: str = "") -> list[str]:
    lines: list[str] = []
    for e in error.errors():
        path = prefix
        for part in e["loc"]:
            if part == "[key]":  # pydantic's location of a bad map key, after the key
                e = {**e, "msg": f"the key: {e['msg'].removeprefix('Value error, ')}"}
            elif isinstance(part, int):
                path += f"[{part}]"
            elif not str(part).startswith(("function-", "tagged-union")):
                path += path_part(str(part))
        path = path.removeprefix(".")
        cause = e.get("ctx", {}).get("error")
        if isinstance(cause, FieldError) and len(cause.more) > 1:
            lines.extend(f"{_join(path, sub)}: {message}" for sub, message in cause.more)
            continue
        if isinstance(cause, FieldError):
            path = _join(path, cause.path)
        message = e["msg"].removeprefix("Value error, ")
        bad = e.get("input")
        shown = "" if isinstance(bad, dict | list) or bad is None else f" (got {shown_value(bad)})"
        if isinstance(bad, str) and repr(bad) != shown_value(bad):
            message = message.replace(repr(bad), shown_value(bad))
        if e["type"] == "string_pattern_mismatch":
            message = PATTERN_HELP.get(e.get("ctx", {}).get("pattern", ""), message)
        if e["type"] == "extra_forbidden":
            message = "unknown field; check its spelling against `xstilts crd` or the README"
        if e["type"] == "missing" or "secrets" in e["loc"]:
            shown = ""  # a bad Secret *name* may be a pasted secret value: never echo it
        lines.append(f"{path or '<spec>'}: {message}{shown}")
    return lines


def parse_document(document: Any, source: str = "<spec>") -> ExperimentSpec:
    """A bare spec or an Experiment object → the spec, or SpecError listing every problem."""
    if not isinstance(document, dict):
        raise SpecError(source, [f"<document>: expected a mapping (YAML object), got {type(document).__name__}"])
    is_object = "apiVersion" in document or "kind" in document
    try:
        document = _whole_numbers(document)
        if is_object:
            if document.get("kind") != KIND or document.get("apiVersion") != API_VERSION:
                raise SpecError(source, [
                    f"apiVersion/kind: expected {API_VERSION} {KIND}, got"
                    f" {shown_value(document.get('apiVersion'))} {shown_value(document.get('kind'))}"
                ])
            return ExperimentObject.model_validate(document).spec
        return ExperimentSpec.model_validate(document)
    except RecursionError:
        raise SpecError(source, ["<document>: nested too deeply to be a spec"]) from None
    except ValidationError as e:
        spec_part = document.get("spec") if is_object else document
        lines = format_errors(e)
        if isinstance(spec_part, dict):
            prefix = "spec." if is_object else ""
            lines += [f"{prefix}{line}" for line in _cross_field_lines(spec_part, e, "spec" if is_object else None)]
        raise SpecError(source, lines) from None


def _whole_numbers(node: Any) -> Any:
    """2.0 as 2: JSON has one number type, and the API server takes an integral number as an
    integer; strict validation would otherwise refuse what `kubectl apply` accepted."""
    if isinstance(node, float) and node.is_integer():
        return int(node)
    if isinstance(node, dict):
        return {k: _whole_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_whole_numbers(v) for v in node]
    return node


# Valid values put in place of missing or invalid required fields, so that the cross-field
# checks that do not read them can still run.
_STAND_INS: dict[str, Any] = {
    "name": "stand-in", "targets": [TARGET_TASKS[0]],
    "models": [{"name": "stand-in", "pretrained": "stand-in", "parameters": 1, "resources": {"gpus": 0}}],
}


def _cross_field_lines(spec: dict[str, Any], error: ValidationError, under: str | None) -> list[str]:
    """The cross-field problems of a spec that also has field errors (pydantic runs model
    validators only on valid fields): checked on the valid fields, with stand-ins for the
    invalid ones, and reported only where they read no invalid field."""
    invalid = set()
    for e in error.errors():
        loc = e["loc"][1:] if under and e["loc"][:1] == (under,) else (() if under else e["loc"])
        if loc:
            invalid.add(str(loc[0]))
    if not invalid:
        return []
    valid = {k: v for k, v in spec.items() if str(k) not in invalid}
    for field, stand_in in _STAND_INS.items():
        if field not in valid:
            valid[field] = stand_in
    try:
        partial = ExperimentSpec.model_validate(valid, context={"fields_only": True})
    except ValidationError:
        return []
    return [f"{path}: {message}" for path, message, reads in grid_problems(partial) if not reads & invalid]


class _SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The C reader where built (a 5 MB spec in well under a second), and no silent last-key-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):  # a list or mapping as a key: the reader refuses it below
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown_value(str(key))}: keep one of them", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes of the document once every alias is expanded, counted without expanding it (an
    alias is the same node object): memoised per node, so linear in the file's size."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(n: yaml.Node) -> int:
        known = sizes.get(id(n))
        if known is not None:
            return known
        if id(n) in busy:
            raise SpecError("", ["<document>: an alias refers to its own anchor (a recursive structure)"])
        busy.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                total += size(key) + size(value)
                if total > limit:
                    break
        busy.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def load_spec_text(text: str, source: str = "<spec>") -> ExperimentSpec:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(source, [f"<document>: {len(text):,} characters, more than a spec may hold"
                                 f" ({MAX_SPEC_BYTES:,}); a spec is a few kilobytes"])
    loader = _SpecLoader(text)  # a safe loader (no Python objects)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, MAX_SPEC_NODES) > MAX_SPEC_NODES:
            raise SpecError(source, [f"<document>: more than {MAX_SPEC_NODES:,} values once its aliases are"
                                     " expanded; a spec is a few hundred (write it without a chain of aliases)"])
        document = None if node is None else loader.construct_document(node)
    except SpecError as e:
        raise SpecError(source, e.problems) from None
    except yaml.YAMLError as e:
        raise SpecError(source, [f"<document>: not valid YAML: {' '.join(str(e).split())}"]) from None
    except RecursionError:
        raise SpecError(source, ["<document>: nested too deeply to be a spec"]) from None
    except ValueError as e:  # the YAML reader's own limits: integers of more than 4300 digits
        reason = "a number has too many digits" if "digits" in str(e) else " ".join(str(e).split())[:200]
        raise SpecError(source, [f"<document>: cannot be read: {reason}"]) from None
    finally:
        loader.dispose()
    return parse_document(document, source)


def to_object(spec: ExperimentSpec, namespace: str | None = None) -> dict[str, Any]:
    """The spec as an Experiment object for the API server."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": namespace or spec.cluster.namespace},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
