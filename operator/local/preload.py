"""What the executor's fork server (forkserver.py) loads once for every run it forks: the
training stack, and the caches each run would otherwise build again. Imported by the server
only; the executor itself never loads torch."""

from __future__ import annotations

import contextlib
import importlib
import os

# What a run imports (python -X importtime, and sys.modules at a run's end). A module missing
# here is imported by the run itself.
MODULES = (
    "torch",
    "transformers",
    "transformers.models.xlm_roberta.modeling_xlm_roberta",
    "transformers.tokenization_utils_tokenizers",
    "transformers.convert_slow_tokenizer",
    "datasets",
    "deepspeed",  # accelerate imports it when it is installed, whether the run uses it or not
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "mlflow.store.db.utils",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",  # MLflow checks the SQLite store's schema with alembic
    "alembic.config",
    "xstilts.trainer.__main__",
    "xstilts.trainer.train",
    "xstilts.trainer.loop",
    "xstilts.trainer.model",
    "xstilts.trainer.features",
    "xstilts.trainer.tracking.tracker",
    "xstilts.operator.local.forkserver",  # each fork's entry point
    "xstilts.operator.cli",  # run again in each fork as the executor's main module under `python -m`
)


def die_with_executor() -> None:
    """The server holds nothing to save: it gets SIGTERM (default action: exit at once) when
    the executor dies, rather than noticing later and spending seconds tearing down torch &
    co., so that the runs it forked get their own SIGTERM at once."""
    from xstilts.operator.local.forkserver import die_with_parent

    die_with_parent(os.getppid())


def load() -> None:
    for name in MODULES:
        # Not installed, or failing here: each run then imports it, and reports any error itself.
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    with contextlib.suppress(Exception):
        # transformers builds its table of checkpoint conversions on the first from_pretrained
        # (about a second on a shared 2-core machine); built here, every fork inherits it.
        importlib.import_module("transformers.conversion_mapping").get_checkpoint_conversion_mapping("xlm-roberta")


die_with_executor()
load()
