"""xstilts.trainer: runs one training run (`python -m xstilts.trainer RUN.json`).

It knows nothing of Kubernetes. `config` and `tasks` import no torch, so the operator can
plan runs without the training stack installed.
"""
