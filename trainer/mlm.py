"""Continued multilingual masked-language modelling during intermediate training (Phang et al.
2020's first variant): a `ratio` share of a run's optimiser steps trains the pretrained model's
MLM objective on a multilingual text corpus, the other steps train the English task(s).

The corpus (`RunConfig.mlm.corpus`): a `.txt` file (one text per line), a `.jsonl` file (objects
with a "text" field), or a directory whose `.txt` and `.jsonl` files are all read, in name order.
A run reads only the texts its MLM steps can use (steps × ratio × batch), so a Wikipedia-sized
corpus costs what the run trains on, not its size.

The MLM head is RoBERTa's (dense → GELU → layer norm → the input embeddings, transposed, plus a
bias), initialised from the pretrained checkpoint's `lm_head` where it has one (XLM-R does) and
tied to the encoder's embeddings by using their weight in its forward pass, not by sharing a
parameter (a shared tensor would stop the checkpoints, which safetensors writes). It is not part
of the saved model: phase 3 starts from the encoder alone, as for any intermediate run.

No torch import at module level: `corpus_files` runs in the pre-check, before the training stack.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xstilts.trainer.data import DataError

log = logging.getLogger(__name__)

CORPUS_SUFFIXES = (".txt", ".jsonl")


def corpus_files(corpus: str) -> list[Path]:
    """The corpus's files; a DataError naming `mlm.corpus` and the layout when there are none."""
    path = Path(corpus)
    if path.is_file():
        if path.suffix not in CORPUS_SUFFIXES:
            raise DataError(f"mlm.corpus {corpus!r} is a {path.suffix or 'suffix-less'} file; give a .txt file (one"
                            " text per line), a .jsonl file (objects with a \"text\" field) or a directory of them")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CORPUS_SUFFIXES)
        if files:
            return files
        raise DataError(f"mlm.corpus {corpus!r} holds no .txt or .jsonl file; put the multilingual text there")
    raise DataError(f"mlm.corpus {corpus!r} does not exist: give a .txt or .jsonl file, or a directory of them,"
                    " as the run sees it")


def texts(files: list[Path]) -> Iterator[str]:
    """The corpus's texts, empty lines skipped; a DataError naming the file and line of a bad row."""
    for path in files:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if path.suffix == ".txt":
                    yield line.strip()
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DataError(f"{path}:{number}: a corpus row must be an object with a \"text\" string")
                if row["text"].strip():
                    yield row["text"].strip()


ENCODE_CHUNK = 10_000  # texts per tokenizer call: memory stays flat however many texts a run draws
CORPUS_VERSION = 1  # bump when the encoding changes: invalidates the cached corpus rows


def encode_corpus(corpus: str, tokenizer: Any, tokenizer_id: str, max_length: int, rows: int,
                  cache_dir: Path) -> Any:
    """The first `rows` texts (the corpus again from its start while it has fewer), tokenized
    and truncated to `max_length`, as a `datasets.Dataset` of input_ids and length, memory-mapped
    from an Arrow file in the tokenized-data cache: written once (under a lock: the other ranks
    wait for it), in chunks, so a million texts take their tokens' size on disk, not Python
    lists' size in memory. Keyed by the tokenizer, the files (path, size, modification time: a
    corpus is too big to hash for every run), the max length and the rows."""
    import datasets
    from xstilts.trainer.rundir import file_lock

    files = corpus_files(corpus)
    doc = {"version": CORPUS_VERSION, "tokenizer": tokenizer_id, "max_length": max_length, "rows": rows,
           "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]
    entry = cache_dir / f"mlm-{key}.arrow"
    if not entry.is_file():
        with file_lock(cache_dir / f"mlm-{key}.lock"):
            if not entry.is_file():
                _write_rows(entry, _drawn(corpus, files, rows), tokenizer, max_length)
    log.info("MLM corpus: %d texts from %s", rows, corpus)
    return datasets.Dataset.from_file(str(entry))


def _drawn(corpus: str, files: list[Path], rows: int) -> Iterator[str]:
    drawn = 0
    while drawn < rows:
        before = drawn
        for text in texts(files):
            yield text
            drawn += 1
            if drawn >= rows:
                return
        if drawn == before:
            raise DataError(f"mlm.corpus {corpus!r} holds no text")


def _write_rows(entry: Path, drawn: Iterator[str], tokenizer: Any, max_length: int) -> None:
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for chunk in iter(lambda: list(itertools.islice(drawn, ENCODE_CHUNK)), []):
                ids = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
                writer.write_batch(pa.record_batch([pa.array(ids, pa.list_(pa.int32())),
                                                    pa.array([len(i) for i in ids], pa.int32())], schema=schema))
        os.replace(tmp, entry)
    finally:
        tmp.unlink(missing_ok=True)


def masker(tokenizer: Any, mask_probability: float) -> Any:
    """BERT's masking (of the non-special tokens, `mask_probability` are chosen: 80% become the
    mask token, 10% a random token, 10% stay), from transformers; it draws from torch's RNG,
    which the run's seed sets (and the data loader's workers seed per worker)."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask_probability)


def mask_batch(collator: Any, input_ids: Any, attention_mask: Any, special_ids: frozenset[int]) -> tuple[Any, Any]:
    """(masked input ids, labels: the original id where masked, -100 elsewhere). Padding and
    special tokens are never masked."""
    import torch

    special = (attention_mask == 0) | torch.isin(input_ids, torch.tensor(sorted(special_ids), dtype=input_ids.dtype))
    masked, labels = collator.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special)
    return masked, labels


def pretrained_head_state(source: str | Path) -> dict[str, Any]:
    """The `lm_head.*` weights of a pretrained checkpoint (hub id or directory), without its
    tied decoder weight; empty when the checkpoint has none (an encoder saved without its MLM
    head). Only those tensors are read, not the model."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(name: str) -> str | None:
        try:
            found: str | None = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False)
            return found
        except OSError:
            return None

    files: list[str] = []
    index = fetch("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
        for shard in sorted({f for k, f in weight_map.items() if k.startswith("lm_head.")}):
            found = fetch(shard)
            if found is not None:
                files.append(found)
    else:
        single = fetch("model.safetensors")
        if single is not None:
            files.append(single)
    state: dict[str, Any] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                if key.startswith("lm_head.") and not key.startswith("lm_head.decoder."):
                    state[key.removeprefix("lm_head.")] = f.get_tensor(key)
    return state
