"""One test per HF Trainer seam (trainer/hf_seams.py): a transformers upgrade that changes one
fails here, naming it."""

import pytest
from transformers import Trainer
from xstilts.trainer.hf_seams import SEAMS, Seam, check_hf_seams, seam_problem
from xstilts.trainer.loop import StiltsTrainer


@pytest.mark.parametrize("seam", SEAMS, ids=lambda s: s.name)
def test_seam_holds_on_installed_transformers(seam: Seam) -> None:
    assert seam_problem(Trainer, seam) is None


@pytest.mark.parametrize("seam", [s for s in SEAMS if s.kind == "override"], ids=lambda s: s.name)
def test_every_override_in_the_table_is_overridden_by_stilts_trainer(seam: Seam) -> None:
    assert seam.name in vars(StiltsTrainer)


def test_stilts_trainer_overrides_no_private_method_outside_the_table() -> None:
    private = {n for n, v in vars(StiltsTrainer).items()
               if n.startswith("_") and not n.startswith("__") and callable(v) and hasattr(Trainer, n)}
    assert private == {s.name for s in SEAMS if s.kind == "override"}


def test_a_changed_transformers_is_reported_naming_the_seam() -> None:
    class Changed:  # a Trainer whose _save_checkpoint lost `trial` and which lacks the rest
        def _save_checkpoint(self, model: object) -> None: ...

    problems = check_hf_seams(Changed)
    assert any("_save_checkpoint no longer takes trial" in p for p in problems)
    assert any("_run_epoch no longer exists" in p for p in problems)
    assert any("self._tr_loss" in p for p in problems)
    assert check_hf_seams() == []
