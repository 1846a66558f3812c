"""CCGbank AUTO files -> the JSON-lines files the tagging loader reads for the `ccg` task
(`{"tokens": [...], "tags": [...]}`, one sentence a line; tags are the lexical categories).

An AUTO file holds, per sentence, an `ID=...` line and a derivation on one line whose leaves
are `(<L category modified-POS original-POS word predicate-argument-category>)`, in word order.
The standard split (Hockenmaier & Steedman 2007): sections 02-21 train, 00 validation, 23
test.

    python -m xstilts.trainer.ccgbank CCGBANK/data/AUTO OUT_DIR

writes OUT_DIR/train.jsonl, validation.jsonl and test.jsonl (`data: {ccg: OUT_DIR}` in a spec).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

LEAF = re.compile(r"<L (\S+) (\S+) (\S+) (\S+) (\S+)>")
SPLITS = {"train": [f"{s:02d}" for s in range(2, 22)], "validation": ["00"], "test": ["23"]}


class AutoFormatError(ValueError):
    pass


def leaves(derivation: str) -> tuple[list[str], list[str]]:
    """(words, categories) of one derivation line."""
    found = LEAF.findall(derivation)
    return [w for _, _, _, w, _ in found], [c for c, _, _, _, _ in found]


def sentences(lines: Iterable[str], where: str = "<input>") -> Iterator[dict[str, list[str]]]:
    """The tagging rows of an AUTO file's lines."""
    expect_tree = False
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("ID="):
            expect_tree = True
            continue
        if not expect_tree:
            raise AutoFormatError(f"{where}:{number}: a derivation without its ID= line before it")
        tokens, tags = leaves(line)
        if not tokens:
            raise AutoFormatError(f"{where}:{number}: no (<L category POS POS word category>) leaf in the line")
        expect_tree = False
        yield {"tokens": tokens, "tags": tags}


def convert(auto_dir: Path, out_dir: Path) -> dict[str, int]:
    """Every section of the standard split to its JSON-lines file; sentences per split."""
    counts = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, sections in SPLITS.items():
        files = sorted(f for s in sections for f in (auto_dir / s).glob("*.auto"))
        if not files:
            raise AutoFormatError(f"no .auto files in sections {', '.join(sections)} of {auto_dir} (the {split}"
                                  " split); give CCGbank's data/AUTO directory")
        n = 0
        with (out_dir / f"{split}.jsonl").open("w", encoding="utf-8") as out:
            for f in files:
                for row in sentences(f.read_text(encoding="utf-8").splitlines(), str(f)):
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
        counts[split] = n
    return counts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m xstilts.trainer.ccgbank CCGBANK/data/AUTO OUT_DIR", file=sys.stderr)
        return 2
    try:
        counts = convert(Path(args[0]), Path(args[1]))
    except (AutoFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {n} sentences" for split, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
