"""What the demo world produces: labelled task items, the multilingual pretraining text, and
task files in the real datasets' schemas and the trainer's local layout.

Labels come from `world.relation`, never from surface form. Every pair differs in one word:

- NLI (mnli, xnli): a more general word of the same group (dog → animal, runs → moves,
  huge → big) is entailment, a more specific one neutral, a word of the same generality from
  another category or the opposite pole (dog → car, runs → sleeps, huge → tiny) contradiction.
- Paraphrase (pawsx): the word's synonym (dog → hound) is a paraphrase; a more general word is
  not: "the dog runs" entails "the animal runs" but does not say the same, PAWS's kind of pair
  that shares every word but one.
- Sentence completion (hellaswag): of four endings, each the context with one word replaced,
  the one that follows from it (a generalisation) against a neutral and two contradictions.

What the tasks leave out is as deliberate. Siblings (dog → cat) and synonyms in NLI differ
from their partners only in which word it is; telling them apart asks a tiny model to memorise
word pairs, more than a few hundred fine-tuning steps can do. Every kept label is a function of
what kind of word came in where (its generality, its pole), which the models can learn.

The guard against surface cues: which slot changes is drawn before the label, so the position
of the change, the sentence lengths and the overlap between the two sentences are alike for
every label, in every language. Only the words tell, and no two languages share a word. A model
that learned English words but was never shown how the other languages' words line up with
them (random weights) transfers at chance; multilingual pretraining is what makes transfer
possible. The targets' English training sets are small; the intermediate tasks follow the same
rules with more data, which is what intermediate training has to offer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from xstilts.demo.world import (
    CONCEPTS,
    KINDS,
    LANGUAGES,
    NLI_LABELS,
    PAWS_LABELS,
    PAWSX_LANGUAGES,
    XNLI_LANGUAGES,
    Clause,
    Kind,
    World,
    of_kind,
    random_clause,
    relation,
)

# --- labelled items (concept level) ---------------------------------------------------------


@dataclass(frozen=True)
class PairItem:
    first: Clause
    second: Clause
    label: int


@dataclass(frozen=True)
class ChoiceItem:
    context: Clause
    endings: tuple[Clause, ...]
    label: int


def replace_word(rng: random.Random, clause: Clause, kind: Kind, concept: str) -> Clause:
    """`clause` with the `kind` slot saying `concept`; the same concept is said with the other
    synonym, so the two sentences always differ in exactly that word."""
    same = concept == clause.concept(kind)
    return clause.with_word(kind, concept, 1 - clause.synonym(kind) if same else rng.randrange(2))


def replacement_label(before: str, after: str) -> str | None:
    """The NLI label of a replacement the tasks use, or None for one they leave out. The tasks
    use the replacements that change what kind of word stands in the slot: a more general word
    of the same group (entailment), a more specific one (neutral), a word of the same
    generality from another category or the opposite pole (contradiction). Siblings (dog → cat,
    huge → giant) and unrelated attributes differ only in which word it is; telling those apart
    would ask a tiny model to memorise word pairs in a few hundred steps."""
    p, h = CONCEPTS[before], CONCEPTS[after]
    if before == after:
        return None
    same_group = p.category == h.category and p.pole == h.pole
    if same_group and p.general != h.general:
        return relation(before, after)
    opposite = p.category == h.category and p.pole != h.pole if p.kind == "adjective" else p.category != h.category
    if p.general == h.general and opposite:
        return relation(before, after)
    return None


def replacements(clause: Clause, kind: Kind, label: str) -> list[str]:
    old = clause.concept(kind)
    return [new for new in of_kind(kind) if replacement_label(old, new) == label]


def _pairs_with(kind: Kind, label: str) -> list[tuple[str, str]]:
    return [(p, h) for p in of_kind(kind) for h in of_kind(kind) if replacement_label(p, h) == label]


def nli_item(rng: random.Random) -> PairItem:
    """The slot first, then the label, then a premise word and a hypothesis word in that
    relation: the slot is independent of the label."""
    kind = rng.choice(KINDS)
    label = rng.randrange(len(NLI_LABELS))
    before, after = rng.choice(_pairs_with(kind, NLI_LABELS[label]))
    premise = random_clause(rng, **{kind: before})
    return PairItem(premise, replace_word(rng, premise, kind, after), label)


def generalises(before: str, after: str) -> bool:
    """The non-paraphrase replacement: a more general word of the same group (dog → animal,
    huge → big). The sentence then still follows from its partner, shares every word but one
    with it, and yet says less: entailed, not a paraphrase."""
    return replacement_label(before, after) == "entailment"


def paws_item(rng: random.Random) -> PairItem:
    """One word replaced by its synonym (a paraphrase) or by a more general word (not)."""
    kind = rng.choice(KINDS)
    label = rng.randrange(len(PAWS_LABELS))
    specific = [c for c in of_kind(kind) if not CONCEPTS[c].general]
    first = random_clause(rng, **{kind: rng.choice(specific)})
    old = first.concept(kind)
    new = old if PAWS_LABELS[label] == "paraphrase" else rng.choice(
        [c for c in of_kind(kind) if generalises(old, c)])
    return PairItem(first, replace_word(rng, first, kind, new), label)


def completion_item(rng: random.Random) -> ChoiceItem:
    """The ending that follows from the context (entailment) against a neutral and two
    contradicting ones, each one word away from the context."""
    context = random_clause(rng)
    while not all(any(replacements(context, k, label) for k in KINDS) for label in NLI_LABELS):
        context = random_clause(rng)  # an entailing and a neutral ending need a specific and a general word

    def ending(label: str) -> Clause:
        kind = rng.choice([k for k in KINDS if replacements(context, k, label)])
        return replace_word(rng, context, kind, rng.choice(replacements(context, kind, label)))

    endings = [ending("entailment"), ending("neutral"), ending("contradiction"), ending("contradiction")]
    order = list(range(len(endings)))
    rng.shuffle(order)
    return ChoiceItem(context, tuple(endings[i] for i in order), order.index(0))


# --- pretraining text ----------------------------------------------------------------------

# Which verbs and attributes go with which things in the pretraining text (not in the tasks):
# the co-occurrences from which a masked-LM learns what belongs to a category.
PREFERENCES = {"animal": ("motion", "size"), "person": ("rest", "temperature"),
               "vehicle": ("motion", "temperature")}


@dataclass(frozen=True)
class CorpusMix:
    """Shares of the masked-LM sequences. Translation pairs (a sentence and its translation in
    one sequence, as in XLM's translation language modelling), code-switched sentences and the
    shared anchors give the languages' disjoint vocabularies something in common; restatement
    pairs (a sentence, then the same scene said more generally) carry the taxonomy, as real
    text does. The rest is monolingual."""

    translation: float = 0.3
    restatement: float = 0.1
    code_switched: float = 0.1  # the rest is monolingual
    switch_rate: float = 0.3
    anchor_rate: float = 0.15  # how often a content word is followed by its shared anchor
    preference: float = 0.8  # how often a clause follows PREFERENCES


def corpus_clause(rng: random.Random, preference: float) -> Clause:
    clause = random_clause(rng)
    if rng.random() >= preference:
        return clause
    verb_category, scale = PREFERENCES[CONCEPTS[clause.noun].category]
    verb = rng.choice([v for v in of_kind("verb") if CONCEPTS[v].category == verb_category])
    adjective = rng.choice([a for a in of_kind("adjective") if CONCEPTS[a].category == scale])
    return random_clause(rng, adjective=adjective, noun=clause.noun, verb=verb)


def restated(rng: random.Random, clause: Clause) -> Clause:
    """The clause said again, one word replaced by a synonym or a more general word."""
    kind = rng.choice(KINDS)
    options = [h for h in of_kind(kind) if relation(clause.concept(kind), h) == "entailment"]
    return replace_word(rng, clause, kind, rng.choice(options))


def pretraining_corpus(world: World, n: int, seed: int,
                       mix: CorpusMix = CorpusMix()) -> Iterator[tuple[str, str | None]]:
    """`n` pretraining sequences: (text, None) for one sentence, (text, text) for a pair."""
    rng = random.Random(f"xstilts-demo-corpus:{seed}")

    def say(clause: Clause, code: str) -> str:
        return world.anchored(rng, clause, code, mix.anchor_rate)

    for _ in range(n):
        clause = corpus_clause(rng, mix.preference)
        code = rng.choice(LANGUAGES)
        u = rng.random()
        if u < mix.translation:
            other = rng.choice([c for c in LANGUAGES if c != code])
            translation = random_clause(rng, adjective=clause.adjective, noun=clause.noun, verb=clause.verb)
            yield say(clause, code), say(translation, other)
        elif u < mix.translation + mix.restatement:
            yield say(clause, code), say(restated(rng, clause), code)
        elif u < mix.translation + mix.restatement + mix.code_switched:
            yield world.code_switched(rng, clause, code, mix.switch_rate, mix.anchor_rate), None
        else:
            yield say(clause, code), None


def parallel_sentences(world: World, n: int, seed: int) -> Iterator[tuple[str, str]]:
    """`n` translation pairs: a clause said in two languages (each with synonyms of its own)."""
    rng = random.Random(f"xstilts-demo-parallel:{seed}")
    for _ in range(n):
        clause = corpus_clause(rng, CorpusMix().preference)
        first, second = rng.sample(LANGUAGES, 2)
        translation = random_clause(rng, adjective=clause.adjective, noun=clause.noun, verb=clause.verb)
        yield world.sentence(clause, first), world.sentence(translation, second)


# --- task files in the hub datasets' schemas -----------------------------------------------


@dataclass(frozen=True)
class DataSizes:
    """Examples per split. The targets' English training sets are small on purpose."""

    xnli_train: int = 1000
    pawsx_train: int = 1000
    target_eval: int = 100  # per language, for validation (and for test unless target_test is set)
    # Per language, for test (default: target_eval). 200 did not narrow the demo's intervals: with
    # items of their own per language, their spread is the fine-tuning's from seed to seed.
    target_test: int | None = None
    mnli_train: int = 3000
    hellaswag_train: int = 1500
    intermediate_eval: int = 300

    @property
    def test_size(self) -> int:
        return self.target_eval if self.target_test is None else self.target_test


def _items(task: str, split: str, n: int, seed: int, stream: str = "") -> list[PairItem | ChoiceItem]:
    # Each task and split (and language, for the targets' evaluation splits) draws from its own
    # stream: mnli is not xnli's training data.
    rng = random.Random(f"xstilts-demo-data:{seed}:{task}:{split}" + (f":{stream}" if stream else ""))
    if task == "hellaswag":
        return [completion_item(rng) for _ in range(n)]
    make = paws_item if task == "pawsx" else nli_item
    return [make(rng) for _ in range(n)]


def task_rows(world: World, task: str, split: str, n: int, language: str = "en",
              per_language: bool = False) -> list[dict[str, object]]:
    """Rows of one split in the hub dataset's columns. With `per_language` each language has
    items of its own; without, the items are the same in every language (translations)."""
    items = _items(task, split, n, world.seed, stream=language if per_language else "")
    say = world.sentence
    rows: list[dict[str, object]] = []
    for i, it in enumerate(items):
        if isinstance(it, ChoiceItem):
            ctx = say(it.context, language)
            rows.append({"ind": i, "activity_label": "demo", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                         "endings": [say(c, language) for c in it.endings],
                         "source_id": f"demo-{split}-{i}", "split": split, "split_type": "indomain",
                         "label": str(it.label)})
        elif task == "pawsx":
            rows.append({"id": i, "sentence1": say(it.first, language),
                         "sentence2": say(it.second, language), "label": it.label})
        else:
            row: dict[str, object] = {"premise": say(it.first, language),
                                      "hypothesis": say(it.second, language), "label": it.label}
            if task == "mnli":
                row["idx"] = i
            rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


# The trainer's local layout: `<dir>/<split>.jsonl` for English tasks, `<dir>/<lang>/<split>.jsonl`
# for multilingual targets, which train on English and test on every language.
INTERMEDIATE_SPLITS = ("train", "validation")
TARGET_SPLITS = ("validation", "test")


def write_task_data(world: World, root: Path, sizes: DataSizes = DataSizes()) -> dict[str, Path]:
    """Write mnli, hellaswag, xnli and pawsx under `root`; return task → directory."""
    root = Path(root)
    out: dict[str, Path] = {}
    for task, n_train in (("mnli", sizes.mnli_train), ("hellaswag", sizes.hellaswag_train)):
        for split in INTERMEDIATE_SPLITS:
            n = n_train if split == "train" else sizes.intermediate_eval
            _write_jsonl(root / task / f"{split}.jsonl", task_rows(world, task, split, n))
        out[task] = root / task
    for task, languages, n_train in (("xnli", XNLI_LANGUAGES, sizes.xnli_train),
                                     ("pawsx", PAWSX_LANGUAGES, sizes.pawsx_train)):
        _write_jsonl(root / task / "en" / "train.jsonl", task_rows(world, task, "train", n_train))
        # Unlike XNLI's and PAWS-X's, whose test sets are translations of one set of 5,010 and
        # 2,000 items, each language here has items of its own: with 100 items per language, a
        # translated set makes the zero-shot average as noisy as its 100 items (seed-to-seed
        # spread of a gain 3-5 points, almost all of it which items there are), where items of
        # its own per language give it 100 × languages items at the same evaluation cost.
        for split in TARGET_SPLITS:
            for lang in languages:
                _write_jsonl(root / task / lang / f"{split}.jsonl",
                             task_rows(world, task, split, sizes.test_size if split == "test" else sizes.target_eval,
                                       lang, per_language=True))
        out[task] = root / task
    return out


# --- the paper's two variants: a multilingual corpus and translated intermediate data ----------


def write_mlm_corpus(world: World, path: Path, n: int = 2000, seed: int = 0) -> Path:
    """A multilingual plain-text corpus for continued MLM (`mlm.corpus`): `n` sentences of the
    pretraining distribution, one per line, in all the world's languages."""
    _write_lines(path, [text for text, _ in pretraining_corpus(world, n, seed)])
    return path


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def write_translations(world: World, task_dir: Path, task: str, languages: Sequence[str], n: int) -> None:
    """Translate-train data: the task's English training split said in each of `languages`
    (the same items, row by row), as `<task_dir>/<language>/train.jsonl`."""
    for lang in languages:
        _write_jsonl(task_dir / lang / "train.jsonl", task_rows(world, task, "train", n, lang))
