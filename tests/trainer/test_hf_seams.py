"""One test per HF Trainer seam (trainer/hf_seams.py): a transformers upgrade that changes one
fails here, naming it."""

import io
import itertools
import json
import logging
import tokenize
from pathlib import Path

import pytest
import xstilts.trainer
from fixtures.tiny_hub import TinyHub, tiny_run_config
from transformers import Trainer
from xstilts.trainer.batch_plan import InvalidRun
from xstilts.trainer.hf_seams import SEAMS, Seam, SeamTrainer, assigns_attribute, check_hf_seams, seam_problem
from xstilts.trainer.loop import StiltsTrainer
from xstilts.trainer.rundir import RunDir
from xstilts.trainer.train import ALLOW_MISSING_SEAMS, run

TRAINER_DIR = Path(xstilts.trainer.__file__).parent


@pytest.mark.parametrize("seam", SEAMS, ids=lambda s: s.name)
def test_seam_holds_on_installed_transformers(seam: Seam) -> None:
    assert seam_problem(Trainer, seam) is None


@pytest.mark.parametrize("seam", [s for s in SEAMS if s.kind == "override"], ids=lambda s: s.name)
def test_every_override_in_the_table_is_in_seam_trainer_and_reaches_stilts_trainer(seam: Seam) -> None:
    assert seam.name in vars(SeamTrainer)
    assert getattr(StiltsTrainer, seam.name) is vars(SeamTrainer)[seam.name]


def private_trainer_overrides(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items()
            if n.startswith("_") and not n.startswith("__") and callable(v) and hasattr(Trainer, n)}


def test_seam_trainer_overrides_no_private_method_outside_the_table() -> None:
    assert private_trainer_overrides(SeamTrainer) == {s.name for s in SEAMS if s.kind == "override"}


def test_stilts_trainer_overrides_no_private_method() -> None:
    assert issubclass(StiltsTrainer, SeamTrainer)
    assert private_trainer_overrides(StiltsTrainer) == set()


def attribute_uses(path: Path) -> set[str]:
    """The names used as `<something>.name` in the module's code (not its comments or strings)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {b.string for a, b in itertools.pairwise(tokens)
            if a.type == tokenize.OP and a.string == "." and b.type == tokenize.NAME}


def test_no_other_trainer_module_touches_a_seam() -> None:
    # every reach into Trainer internals stays in hf_seams.py, next to its table
    seams = {s.name for s in SEAMS}
    offenders = {path.name: attribute_uses(path) & seams for path in sorted(TRAINER_DIR.rglob("*.py"))
                 if path.name != "hf_seams.py"}
    assert {name: used for name, used in offenders.items() if used} == {}
    assert attribute_uses(TRAINER_DIR / "hf_seams.py") >= seams


def test_a_changed_transformers_is_reported_naming_the_seam() -> None:
    class Changed:  # a Trainer whose _save_checkpoint lost `trial` and which lacks the rest
        def _save_checkpoint(self, model: object) -> None: ...

    problems = check_hf_seams(Changed)
    assert any("_save_checkpoint no longer takes trial" in p for p in problems)
    assert any("_run_epoch no longer exists" in p for p in problems)
    assert any("self._tr_loss" in p for p in problems)
    assert check_hf_seams() == []


def test_a_missing_seam_refuses_the_run_and_degrades_only_when_allowed(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The installed transformers holds every seam, so ask for one it lacks: the run's own gate
    # (train.py) is what is under test, with a real training run behind it.
    from xstilts.trainer import hf_seams

    lacking = Seam("_a_method_this_transformers_lacks", "override")
    monkeypatch.setattr(hf_seams, "SEAMS", (*SEAMS, lacking))
    config = tiny_run_config(tiny_hub, tmp_path, ("mnli",), hyperparameters={"max_train_examples": 32})
    monkeypatch.delenv(ALLOW_MISSING_SEAMS, raising=False)
    with pytest.raises(InvalidRun, match=r"Trainer\._a_method_this_transformers_lacks no longer exists"):
        run(config, cache_dir=tiny_cache)
    assert not RunDir.of(config).result.exists()

    monkeypatch.setenv(ALLOW_MISSING_SEAMS, "1")
    with caplog.at_level(logging.WARNING, logger="xstilts"):
        result = run(config, cache_dir=tiny_cache)
    assert result.metrics and RunDir.of(config).result.exists()
    assert any("degraded: Trainer._a_method_this_transformers_lacks no longer exists" in r.getMessage()
               for r in caplog.records)


def test_the_entry_point_refuses_a_transformers_without_a_seam_and_trains_degraded_when_allowed(
        tiny_hub: TinyHub, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    # An installed transformers whose Trainer lacks one of the table's methods: the check reads
    # the Trainer the seams module imported, so that is the one replaced (SeamTrainer still
    # trains on the real one: a degraded run must train, only the seam's extra is off).
    from xstilts.trainer import hf_seams
    from xstilts.trainer.__main__ import main
    from xstilts.trainer.config import ExitCode
    from xstilts.trainer.features import CACHE_ENV

    class OlderTrainer(Trainer):
        _load_rng_state = None  # not callable: as if this transformers had no such method

    monkeypatch.setattr(hf_seams, "Trainer", OlderTrainer)
    monkeypatch.setenv(CACHE_ENV, str(tiny_cache))
    config = tiny_run_config(tiny_hub, tmp_path, ("mnli",), hyperparameters={"max_train_examples": 32})
    run_json = tmp_path / "RUN.json"
    run_json.write_text(config.to_json(), encoding="utf-8")

    monkeypatch.delenv(ALLOW_MISSING_SEAMS, raising=False)
    assert main([str(run_json)]) == ExitCode.INVALID
    err = capsys.readouterr().err
    assert "Traceback" not in err
    refusal = [line for line in err.splitlines() if line.startswith("xstilts.trainer: invalid run:")]
    assert len(refusal) == 1, err
    assert "the installed transformers lacks Trainer internals xstilts needs" in refusal[0]
    assert "Trainer._load_rng_state no longer exists" in refusal[0] and "trainer/hf_seams.py" in refusal[0]
    assert not RunDir.of(config).result.exists()

    monkeypatch.setenv(ALLOW_MISSING_SEAMS, "1")
    with caplog.at_level(logging.WARNING, logger="xstilts"):
        assert main([str(run_json)]) == ExitCode.OK
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "xstilts.trainer"]
    assert any("degraded: Trainer._load_rng_state no longer exists" in r.getMessage() for r in warnings)
    result = RunDir.of(config).result
    assert result.exists() and json.loads(result.read_text())["train_steps"] > 0


def test_an_attribute_counts_as_assigned_only_where_a_method_stores_it() -> None:
    class Loop:
        def train(self) -> None:
            def step() -> None:
                self.stored_in_a_closure = 1
            step()
            print(self.only_read)

    class Subclass(Loop):
        pass

    assert assigns_attribute(Subclass, "stored_in_a_closure")
    assert not assigns_attribute(Subclass, "only_read")
    assert assigns_attribute(Trainer, "_tr_loss")
