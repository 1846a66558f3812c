"""The CCGbank AUTO converter, on hand-written AUTO lines: what it writes is what the ccg
task's loader reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from xstilts.trainer.ccgbank import AutoFormatError, convert, sentences
from xstilts.trainer.data import normalize_rows, read_jsonl
from xstilts.trainer.tasks import TASKS

AUTO = "\n".join([
    "ID=wsj_0201.1 PARSER=GOLD NUMPARSE=1",
    # one derivation a line, as in CCGbank
    "(<T S[dcl] 0 2> (<T S[dcl] 1 2> (<T NP 0 1> (<L N NNP NNP Vinken N>) )"
    " (<T S[dcl]\\NP 0 2> (<L (S[dcl]\\NP)/NP VBZ VBZ chairs (S[dcl]\\NP_1)/NP_2>)"
    " (<T NP 0 2> (<L NP[nb]/N DT DT the NP[nb]_3/N_3>) (<L N NN NN board N>) ) ) ) (<L . . . . .>) )",
    "ID=wsj_0201.2 PARSER=GOLD NUMPARSE=1",
    "(<T S[dcl] 0 2> (<L NP PRP PRP It NP>) (<L S[dcl]\\NP VBZ VBZ works S[dcl]\\NP_1>) )",
]) + "\n"


def test_auto_lines_give_words_and_their_categories() -> None:
    rows = list(sentences(AUTO.splitlines()))
    assert rows == [
        {"tokens": ["Vinken", "chairs", "the", "board", "."],
         "tags": ["N", "(S[dcl]\\NP)/NP", "NP[nb]/N", "N", "."]},
        {"tokens": ["It", "works"], "tags": ["NP", "S[dcl]\\NP"]},
    ]


def test_a_bad_line_is_named() -> None:
    with pytest.raises(AutoFormatError, match=r"x\.auto:2: no .* leaf"):
        list(sentences(["ID=1", "(<T S 0 1> )"], "x.auto"))
    with pytest.raises(AutoFormatError, match=r"x\.auto:1: a derivation without its ID= line"):
        list(sentences(["(<L N NN NN a N>)"], "x.auto"))


def test_the_standard_split_is_written_for_the_ccg_loader(tmp_path: Path) -> None:
    auto = tmp_path / "AUTO"
    for section in ("00", "02", "21", "23"):
        (auto / section).mkdir(parents=True)
        (auto / section / f"wsj_{section}01.auto").write_text(AUTO)
    out = tmp_path / "ccg"
    assert convert(auto, out) == {"train": 4, "validation": 2, "test": 2}
    examples = normalize_rows(TASKS["ccg"], read_jsonl(out / "train.jsonl"), "train")
    assert examples[1] == {"tokens": ["It", "works"], "tags": ["NP", "S[dcl]\\NP"]}
    done = subprocess.run([sys.executable, "-m", "xstilts.trainer.ccgbank", str(tmp_path / "nothing"), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no .auto files" in done.stderr and "Traceback" not in done.stderr
    assert json.loads((out / "test.jsonl").read_text().splitlines()[0])["tokens"][0] == "Vinken"
