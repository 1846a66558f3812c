"""Shared fixtures live in tests/fixtures/ as pytest plugins, one module per real part they
stand up (a tiny hub of models and data, an MLflow server, ...)."""

import os

# Tests never reach the Hugging Face hub: models, tokenizers and data are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins: list[str] = ["fixtures.mlflow_server", "fixtures.tiny_hub"]
