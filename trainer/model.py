"""The model: a pretrained encoder (`AutoModel`) shared by one head per task.

Heads, by format:
    classification   the first token → dropout → dense → tanh → dropout → labels (RoBERTa's head)
    multiple_choice  each (context, choice) pair through the encoder, the same head with one
                     output scores it; softmax over the choices
    span_qa          a start and an end logit per token
    tagging          a tag per token, trained and scored on each word's first sub-token

A batch holds rows of one task (`task_index` selects the head), so a multi-task run is one
encoder with several heads and batches drawn from one task at a time.

Final model layout (`model/` of a run; resume checkpoints are the Trainer's, under `resume/`):
the encoder as `save_pretrained` writes it
(config.json, model.safetensors: `AutoModel.from_pretrained(dir)` loads it, and that is how
phase 3 starts from a phase-2 run), the tokenizer, and the heads in heads.safetensors with
their specs in heads.json.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from xstilts.trainer.scoring import IGNORE
from xstilts.trainer.tasks import Format

HEADS_FILE = "heads.safetensors"
HEADS_SPEC_FILE = "heads.json"


@dataclass(frozen=True)
class HeadSpec:
    task: str
    format: Format
    labels: tuple[str, ...] = ()  # classification classes or tagging tags

    @property
    def outputs(self) -> int:
        if self.format is Format.MULTIPLE_CHOICE:
            return 1
        if self.format is Format.SPAN_QA:
            return 2
        return len(self.labels)


class ClassificationHead(nn.Module):
    def __init__(self, hidden: int, outputs: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, outputs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden_states[:, 0])
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


class TokenHead(nn.Module):
    """Per-token logits: tags, or the start and end scores of span QA."""

    def __init__(self, hidden: int, outputs: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, outputs)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(hidden_states))


class MaskedLMHead(nn.Module):
    """RoBERTa's MLM head (dense → GELU → layer norm → vocabulary logits), its output projection
    the encoder's input embeddings, passed in at each call (trainer/mlm.py says why)."""

    def __init__(self, hidden: int, vocabulary: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocabulary))

    def forward(self, hidden_states: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(functional.gelu(self.dense(hidden_states)))
        return functional.linear(x, embeddings, self.bias)


def make_head(spec: HeadSpec, hidden: int, dropout: float) -> nn.Module:
    if spec.format in (Format.CLASSIFICATION, Format.MULTIPLE_CHOICE):
        return ClassificationHead(hidden, spec.outputs, dropout)
    return TokenHead(hidden, spec.outputs, dropout)


class MultiTaskModel(nn.Module):
    """Encoder + heads. forward(input_ids, attention_mask, task_index, labels...) returns a dict
    with "logits" (or "start_logits"/"end_logits") and, given labels, "loss"."""

    main_input_name = "input_ids"

    def __init__(self, encoder: Any, specs: Sequence[HeadSpec], mlm: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.specs = tuple(specs)
        dropout: float | None = getattr(self.config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(self.config, "hidden_dropout_prob", 0.1)
        self.heads = nn.ModuleDict({s.task: make_head(s, self.config.hidden_size, dropout) for s in self.specs})
        std = getattr(self.config, "initializer_range", 0.02)
        for head in self.heads.values():
            for module in head.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    nn.init.zeros_(module.bias)
        # Continued MLM (trainer/mlm.py): batches whose task_index is len(specs) train it. Outside
        # `heads`, so the saved model (save_model) leaves it out.
        self.mlm_head: MaskedLMHead | None = None
        if mlm:
            self.mlm_head = MaskedLMHead(self.config.hidden_size, self.config.vocab_size,
                                         getattr(self.config, "layer_norm_eps", 1e-5))
            nn.init.normal_(self.mlm_head.dense.weight, std=std)
            nn.init.zeros_(self.mlm_head.dense.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_index: torch.Tensor,
                labels: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.mlm_head is not None and int(task_index[0]) == len(self.specs):
            return self._mlm(input_ids, attention_mask, labels)
        spec = self.specs[int(task_index[0])]
        head = self.heads[spec.task]
        if spec.format is Format.MULTIPLE_CHOICE:
            batch, choices, width = input_ids.shape
            hidden = self._encode(input_ids.view(-1, width), attention_mask.view(-1, width))
            logits = head(hidden).view(batch, choices)
            return _with_loss({"logits": logits}, labels, lambda y: functional.cross_entropy(logits, y))
        hidden = self._encode(input_ids, attention_mask)
        if spec.format is Format.CLASSIFICATION:
            logits = head(hidden)
            return _with_loss({"logits": logits}, labels, lambda y: functional.cross_entropy(logits, y))
        if spec.format is Format.TAGGING:
            logits = head(hidden)
            return _with_loss({"logits": logits}, labels, lambda y: functional.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE))
        start_logits, end_logits = head(hidden).unbind(-1)
        out = {"start_logits": start_logits, "end_logits": end_logits}
        if start_positions is not None and end_positions is not None:
            width = start_logits.size(1)  # positions past the window are ignored, as in the reference
            starts, ends = start_positions.clamp(0, width), end_positions.clamp(0, width)
            out["loss"] = (functional.cross_entropy(start_logits, starts, ignore_index=width)
                           + functional.cross_entropy(end_logits, ends, ignore_index=width)) / 2
        return out

    def _mlm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        assert self.mlm_head is not None
        hidden = self._encode(input_ids, attention_mask)
        # Under ZeRO-3 this weight is partitioned; DeepSpeed gathers it on this access, in a forward
        # pass, and registers it as an external parameter of the running module.
        embeddings = self.encoder.get_input_embeddings().weight
        if labels is None:
            return {"logits": self.mlm_head(hidden, embeddings)}
        # Vocabulary logits only where a token was masked: a 250k vocabulary at every position
        # would cost more than the encoder.
        chosen = labels != IGNORE
        logits = self.mlm_head(hidden[chosen], embeddings)
        loss = functional.cross_entropy(logits, labels[chosen]) if logits.numel() else hidden.sum() * 0.0
        return {"logits": logits, "loss": loss}

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _with_loss(out: dict[str, torch.Tensor], labels: torch.Tensor | None, loss: Any) -> dict[str, torch.Tensor]:
    if labels is not None:
        out["loss"] = loss(labels)
    return out


# --- building and loading -----------------------------------------------------------------------


def attention_kernel(model_class: Any, cuda: bool, half_precision: bool) -> str:
    """The fastest attention the architecture supports here: flash-attention-2 on a GPU in
    bf16/fp16 when the flash_attn package is installed (it skips padded positions entirely),
    else PyTorch's scaled_dot_product_attention (fused kernels, no stored score matrix), else
    the architecture's own eager attention."""
    import importlib.util

    if (cuda and half_precision and getattr(model_class, "_supports_flash_attn", False)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def parameter_count_of(source: str | Path) -> int:
    """Parameters of the encoder at `source`, counted from its config without loading or
    allocating weights."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        encoder = AutoModel.from_config(config, **_no_pooler(AutoModel._model_mapping[type(config)]))
    return sum(p.numel() for p in encoder.parameters())


def _no_pooler(model_class: Any) -> dict[str, Any]:
    has_pooler = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if has_pooler else {}


def load_encoder(source: str | Path, cuda: bool = False, half_precision: bool = False) -> Any:
    """The encoder of a hub model or a local directory, without a pooler where the
    architecture has one (heads use the first token; an unused pooler would leave parameters
    without gradients, which DDP rejects), with the fastest attention kernel available."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source)
    model_class = AutoModel._model_mapping[type(config)]
    return AutoModel.from_pretrained(source, attn_implementation=attention_kernel(model_class, cuda, half_precision),
                                     **_no_pooler(model_class))


def build_model(encoder_source: str | Path, specs: Sequence[HeadSpec], seed: int, cuda: bool = False,
                half_precision: bool = False, mlm: bool = False) -> MultiTaskModel:
    """The encoder from `encoder_source` (a pretrained model, or a phase-2 run's final model)
    and freshly initialised heads, their initialisation fixed by `seed`; with `mlm`, also an MLM
    head, from the checkpoint's own where it has one."""
    encoder = load_encoder(encoder_source, cuda, half_precision)
    torch.manual_seed(seed)
    model = MultiTaskModel(encoder, specs, mlm=mlm)
    if model.mlm_head is not None:
        from xstilts.trainer.mlm import pretrained_head_state

        state = pretrained_head_state(encoder_source)
        expected = set(model.mlm_head.state_dict())
        if expected <= set(state):
            model.mlm_head.load_state_dict({k: state[k] for k in expected})
            model.mlm_head.to(next(encoder.parameters()).dtype)
        else:
            import logging

            logging.getLogger(__name__).warning(
                "%s has no RoBERTa-style lm_head weights (%s): the MLM head starts untrained", encoder_source,
                ", ".join(sorted(expected - set(state))))
    return model


def encoder_parameter_count(model: MultiTaskModel) -> int:
    """Parameters of the encoder (the model size the study is about; heads are a few
    thousand). ZeRO-3 partitions parameters, which then report their full size as ds_numel."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.encoder.parameters())


def save_model(model: MultiTaskModel, out_dir: str | Path, tokenizer: Any = None,
               state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the final model layout to a temporary sibling and rename it into place, so that a
    directory named `out_dir` is always complete. `state_dict` is the full model state (under
    ZeRO-3 the gathered one); default: the model's own."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = dict(state_dict if state_dict is not None else model.state_dict())
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    head_state = {k.removeprefix("heads."): v.contiguous() for k, v in state.items() if k.startswith("heads.")}
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Weights under the names the module has: transformers would otherwise rename some back to
    # the legacy names it converted while loading (LayerNorm.gamma under ZeRO-3, for one).
    model.encoder.save_pretrained(tmp, state_dict=encoder_state, save_original_format=False)
    save_file(head_state, str(tmp / HEADS_FILE), metadata={"format": "pt"})
    specs = [{**asdict(s), "format": str(s.format), "labels": list(s.labels)} for s in model.specs]
    (tmp / HEADS_SPEC_FILE).write_text(json.dumps({"heads": specs}, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_head_specs(model_dir: str | Path) -> list[HeadSpec]:
    doc = json.loads((Path(model_dir) / HEADS_SPEC_FILE).read_text(encoding="utf-8"))
    return [HeadSpec(h["task"], Format(h["format"]), tuple(h["labels"])) for h in doc["heads"]]


def load_model(model_dir: str | Path) -> MultiTaskModel:
    """A saved run's model, encoder and heads, as it was at the end of training."""
    from safetensors.torch import load_file

    model = MultiTaskModel(load_encoder(model_dir), read_head_specs(model_dir))
    model.heads.load_state_dict(load_file(str(Path(model_dir) / HEADS_FILE)))
    return model
