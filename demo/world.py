"""The demo world: concepts, 17 languages that say them, and the rule that labels pairs.

One shared grammar of clauses ("the huge dog runs": an adjective, a noun, a verb) is realised
in the XNLI and PAWS-X languages. Each language is a systematic transform of that grammar: its
word order (subject-verb or verb-subject), adjective position, articles, subject particles,
adjective linkers and sentence-final particles, loosely following the real language's typology,
and its own vocabulary of generated pseudo-words written in its own characters. English uses
real English words. No two languages share a character, so no two share a word or a subword:
a label can never be carried by token overlap across languages.

Every concept has two synonyms in every language. Concepts form small taxonomies: a general
word and its mutually exclusive specific members (animal: dog, cat, ...; moves: runs, swims,
...), and adjective scales with two opposite poles (big: huge, giant / small: tiny, ...).
`relation` is the one rule behind every label.

Pure Python, deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from dataclasses import asdict, dataclass
from typing import Literal

WORLD_VERSION = 2  # bump when rules or realisation change: invalidates every cache

NLI_LABELS = ("entailment", "neutral", "contradiction")  # the order of xstilts.trainer.tasks
PAWS_LABELS = ("different", "paraphrase")

# --- concepts ------------------------------------------------------------------------------

Synonyms = tuple[str, str]  # the English words; the first is the concept's key

# category: (general word, its specific members)
NOUNS: dict[str, tuple[Synonyms, tuple[Synonyms, ...]]] = {
    "animal": (("animal", "creature"), (("dog", "hound"), ("cat", "kitty"), ("horse", "steed"),
                                        ("rabbit", "bunny"))),
    "person": (("person", "human"), (("child", "kid"), ("doctor", "physician"),
                                     ("teacher", "tutor"), ("sailor", "mariner"))),
    "vehicle": (("vehicle", "machine"), (("car", "automobile"), ("boat", "vessel"),
                                         ("truck", "lorry"), ("bicycle", "bike"))),
}
VERBS: dict[str, tuple[Synonyms, tuple[Synonyms, ...]]] = {
    "motion": (("moves", "travels"), (("runs", "sprints"), ("swims", "paddles"),
                                      ("jumps", "leaps"), ("crawls", "creeps"))),
    "rest": (("rests", "relaxes"), (("sleeps", "slumbers"), ("sits", "perches"),
                                    ("waits", "lingers"), ("lies", "reclines"))),
}
# scale: two opposite poles, each (general word, its intensified members)
ADJECTIVES: dict[str, tuple[tuple[Synonyms, tuple[Synonyms, ...]], ...]] = {
    "size": ((("big", "large"), (("huge", "immense"), ("giant", "colossal"))),
             (("small", "little"), (("tiny", "minute"), ("miniature", "minuscule")))),
    "temperature": ((("hot", "heated"), (("boiling", "scalding"), ("scorching", "searing"))),
                    (("cold", "chilly"), (("freezing", "frigid"), ("icy", "frosty")))),
}

Kind = Literal["adjective", "noun", "verb"]
KINDS: tuple[Kind, ...] = ("adjective", "noun", "verb")  # the slots of a clause


@dataclass(frozen=True)
class Concept:
    key: str
    kind: Kind
    category: str  # noun or verb category, or the adjective's scale
    general: bool
    pole: int = 0  # adjectives: which end of the scale
    english: Synonyms = ("", "")


def _concepts() -> dict[str, Concept]:
    out: dict[str, Concept] = {}

    def add(words: Synonyms, kind: Kind, category: str, general: bool, pole: int = 0) -> None:
        out[words[0]] = Concept(words[0], kind, category, general, pole, words)

    for kind, table in (("noun", NOUNS), ("verb", VERBS)):
        for category, (general, members) in table.items():
            add(general, kind, category, True)  # type: ignore[arg-type]
            for m in members:
                add(m, kind, category, False)  # type: ignore[arg-type]
    for scale, poles in ADJECTIVES.items():
        for pole, (general, members) in enumerate(poles):
            add(general, "adjective", scale, True, pole)
            for m in members:
                add(m, "adjective", scale, False, pole)
    return out


CONCEPTS = _concepts()


def of_kind(kind: Kind) -> list[str]:
    return [c.key for c in CONCEPTS.values() if c.kind == kind]


def relation(premise: str, hypothesis: str) -> str:
    """The NLI label of saying `hypothesis` where a sentence about one scene said `premise`
    (two concept keys of one kind). The same concept (a synonym) is entailment."""
    p, h = CONCEPTS[premise], CONCEPTS[hypothesis]
    if p.kind != h.kind:
        raise ValueError(f"{p.key!r} is a {p.kind}, {h.key!r} a {h.kind}: no relation")
    if p == h:
        return "entailment"
    if p.kind == "adjective":
        if p.category != h.category:
            return "neutral"  # a dog can be huge and cold
        if p.pole != h.pole:
            return "contradiction"  # huge vs tiny
    elif p.category != h.category:
        return "contradiction"  # an animal is not a vehicle; running is not resting
    if not p.general and h.general:
        return "entailment"  # dog → animal, huge → big
    if p.general and not h.general:
        return "neutral"  # animal → dog
    # siblings: a dog is not a cat, running is not swimming; huge and giant may both hold
    return "neutral" if p.kind == "adjective" else "contradiction"


# --- clauses -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """What one sentence says: a concept per slot, and which synonym says each."""

    adjective: str
    noun: str
    verb: str
    synonyms: tuple[int, int, int] = (0, 0, 0)  # per slot, in KINDS order

    def concept(self, kind: Kind) -> str:
        return str(getattr(self, kind))

    def synonym(self, kind: Kind) -> int:
        return self.synonyms[KINDS.index(kind)]

    def with_word(self, kind: Kind, concept: str, synonym: int) -> Clause:
        synonyms = list(self.synonyms)
        synonyms[KINDS.index(kind)] = synonym
        values = {k: self.concept(k) for k in KINDS} | {kind: concept}
        return Clause(values["adjective"], values["noun"], values["verb"],
                      (synonyms[0], synonyms[1], synonyms[2]))


def random_clause(rng: random.Random, **fixed: str) -> Clause:
    values = {k: fixed.get(k) or rng.choice(of_kind(k)) for k in KINDS}
    return Clause(values["adjective"], values["noun"], values["verb"],
                  (rng.randrange(2), rng.randrange(2), rng.randrange(2)))


# --- languages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Grammar:
    """How one language says a clause."""

    code: str
    verb_first: bool = False  # verb before the subject (Arabic)
    adjective_after: bool = False
    article: Literal["none", "before", "after"] = "none"  # "after": suffixed (Bulgarian)
    subject_particle: bool = False  # a particle after the subject (Japanese, Korean)
    linker: bool = False  # a particle between adjective and noun (Chinese 的)
    final_particle: bool = False  # a sentence-final auxiliary or particle (Hindi, Urdu, Turkish)


GRAMMARS: dict[str, Grammar] = {g.code: g for g in [
    Grammar("en", article="before"),
    Grammar("fr", adjective_after=True, article="before"),
    Grammar("es", adjective_after=True, article="before"),
    Grammar("de", article="before"),
    Grammar("el", article="before"),
    Grammar("bg", article="after"),
    Grammar("ru", final_particle=True),
    Grammar("tr", final_particle=True),
    Grammar("ar", verb_first=True, adjective_after=True, article="before"),
    Grammar("vi", adjective_after=True, article="before"),  # a classifier
    Grammar("th", adjective_after=True, final_particle=True),
    Grammar("zh", linker=True),
    Grammar("hi", final_particle=True),
    Grammar("sw", adjective_after=True, article="before"),
    Grammar("ur", final_particle=True),
    Grammar("ja", subject_particle=True, final_particle=True),
    Grammar("ko", subject_particle=True, final_particle=True),
]}
LANGUAGES = tuple(GRAMMARS)
XNLI_LANGUAGES = ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th", "zh", "hi", "sw", "ur")
PAWSX_LANGUAGES = ("en", "de", "es", "fr", "ja", "ko", "zh")


def _letters(start: int, stop: int, step: int = 1, category: str = "L") -> str:
    return "".join(c for c in map(chr, range(start, stop, step))
                   if unicodedata.category(c).startswith(category) and c.lower() == c)


# Each language writes its pseudo-words with its own characters, disjoint from every other's.
# Alphabetic scripts make a syllable of two characters, syllabic ones of one.
SCRIPTS: dict[str, tuple[str, int]] = {
    "fr": (_letters(0xE0, 0x100), 2),
    "es": (_letters(0x101, 0x138, 2), 2),
    "de": (_letters(0x13A, 0x149, 2) + _letters(0x14B, 0x178, 2), 2),
    "el": (_letters(0x3B1, 0x3CA), 2),
    "bg": (_letters(0x450, 0x460) + _letters(0x461, 0x482, 2), 2),
    "ru": (_letters(0x430, 0x450), 2),
    "tr": (_letters(0x180, 0x1C0), 2),
    "ar": (_letters(0x628, 0x64B, category="Lo"), 2),
    "vi": (_letters(0x1EA1, 0x1EFA, 2), 2),
    "th": (_letters(0xE01, 0xE2F, category="Lo"), 2),
    "zh": (_letters(0x4E00, 0x4F00, category="Lo"), 1),
    "hi": (_letters(0x905, 0x93A, category="Lo"), 2),
    "sw": (_letters(0x250, 0x270), 2),
    "ur": (_letters(0x679, 0x6D4, category="Lo"), 2),
    "ja": (_letters(0x3041, 0x3097, category="Lo"), 1),
    "ko": (_letters(0xAC00, 0xAD00, category="Lo"), 1),
}
FUNCTION_WORDS = ("det", "subject", "link", "final")

# Symbols every language writes the same way, as emoji and names are shared across real
# languages. In the pretraining text a word is now and then followed by its concept's symbol;
# these shared anchors are how the languages' disjoint vocabularies come to line up. They never
# occur in task data, so they cannot carry a label.
ANCHORS: dict[str, str] = {
    "animal": "🐾", "dog": "🐕", "cat": "🐈", "horse": "🐎", "rabbit": "🐇",
    "person": "👤", "child": "👶", "doctor": "💉", "teacher": "📚", "sailor": "⚓",
    "vehicle": "🛞", "car": "🚗", "boat": "⛵", "truck": "🚚", "bicycle": "🚲",
    "moves": "👣", "runs": "🏃", "swims": "🏊", "jumps": "🦘", "crawls": "🐛",
    "rests": "💤", "sleeps": "😴", "sits": "💺", "waits": "⏳", "lies": "🛌",
    "big": "🔼", "huge": "🐘", "giant": "🗻", "small": "🔽", "tiny": "🐜", "miniature": "🔬",
    "hot": "🌡", "boiling": "🍲", "scorching": "🌞", "cold": "🧊", "freezing": "⛄", "icy": "🥶",
}


def word_key(concept: str, synonym: int) -> str:
    return f"{concept}/{synonym}"


def lexicon_keys() -> list[str]:
    return [word_key(c, s) for c in CONCEPTS for s in (0, 1)] + list(FUNCTION_WORDS)


def english_lexicon() -> dict[str, str]:
    lex = {word_key(c.key, s): c.english[s] for c in CONCEPTS.values() for s in (0, 1)}
    return lex | {"det": "the"}


def pseudo_lexicon(code: str, seed: int) -> dict[str, str]:
    """Generated words for one language: content words of 2-3 syllables, function words of
    one, all distinct within the language."""
    chars, per_syllable = SCRIPTS[code]
    rng = random.Random(f"xstilts-demo:{seed}:{code}")
    half = len(chars) // 2
    onsets, nuclei = (chars[:half], chars[half:]) if per_syllable == 2 else (chars, "")
    used: set[str] = set()

    def fresh(syllables: tuple[int, ...]) -> str:
        while True:
            n = rng.choice(syllables)
            word = "".join(rng.choice(onsets) + (rng.choice(nuclei) if nuclei else "") for _ in range(n))
            if word not in used:
                used.add(word)
                return word

    lex = {key: fresh((1,)) for key in FUNCTION_WORDS}
    return lex | {key: fresh((2, 3)) for key in lexicon_keys() if key not in lex}


@dataclass(frozen=True)
class World:
    """Every language's lexicon; says clauses as sentences."""

    seed: int
    lexicons: dict[str, dict[str, str]]

    @classmethod
    def build(cls, seed: int = 0) -> World:
        return cls(seed, {code: english_lexicon() if code == "en" else pseudo_lexicon(code, seed)
                          for code in LANGUAGES})

    def fingerprint(self) -> str:
        """A hash of everything the world is generated from, for cache keys."""
        doc = {"version": WORLD_VERSION, "seed": self.seed, "lexicons": self.lexicons,
               "grammars": {c: asdict(g) for c, g in GRAMMARS.items()}}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def vocabulary(self, code: str) -> set[str]:
        """The words a language's sentences can contain."""
        return {self.lexicons[code][k] for k in self.keys_used(code)}

    @staticmethod
    def keys_used(code: str) -> list[str]:
        g = GRAMMARS[code]
        used = {"det": g.article != "none", "subject": g.subject_particle, "link": g.linker,
                "final": g.final_particle}
        return [k for k in lexicon_keys() if used.get(k, True)]

    def realize_keys(self, clause: Clause, code: str) -> list[str]:
        """The lexicon keys of the sentence, in order."""
        g = GRAMMARS[code]
        adjective = word_key(clause.adjective, clause.synonym("adjective"))
        noun = word_key(clause.noun, clause.synonym("noun"))
        phrase = ([noun, adjective] if g.adjective_after
                  else [adjective, "link", noun] if g.linker else [adjective, noun])
        if g.article == "before":
            phrase.insert(0, "det")
        elif g.article == "after":
            phrase.append("det")
        if g.subject_particle:
            phrase.append("subject")
        verb = [word_key(clause.verb, clause.synonym("verb"))]
        keys = verb + phrase if g.verb_first else phrase + verb
        return keys + (["final"] if g.final_particle else [])

    def sentence(self, clause: Clause, code: str) -> str:
        lex = self.lexicons[code]
        return " ".join(lex[k] for k in self.realize_keys(clause, code))

    def anchored(self, rng: random.Random, clause: Clause, code: str, rate: float) -> str:
        """The sentence with each content word followed, with probability `rate`, by its
        concept's shared anchor symbol."""
        lex, words = self.lexicons[code], []
        for key in self.realize_keys(clause, code):
            words.append(lex[key])
            if key not in FUNCTION_WORDS and rng.random() < rate:
                words.append(ANCHORS[key.split("/")[0]])
        return " ".join(words)

    def code_switched(self, rng: random.Random, clause: Clause, code: str, rate: float,
                      anchor_rate: float = 0.0) -> str:
        """The sentence in `code`'s grammar with some content words said in other languages,
        as bilingual speakers do; function words stay, so the grammar stays `code`'s."""
        words = []
        for key in self.realize_keys(clause, code):
            lex = self.lexicons[code]
            content = key not in FUNCTION_WORDS
            if content and rng.random() < rate:
                lex = self.lexicons[rng.choice(LANGUAGES)]
            words.append(lex[key])
            if content and rng.random() < anchor_rate:
                words.append(ANCHORS[key.split("/")[0]])
        return " ".join(words)
