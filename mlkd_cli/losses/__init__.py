"""Losses, what a network learns in training: every formula in one place. `registry` names each
distillation loss (`--loss`, `--list-losses`, `--loss-param`, preset `loss_params`) with its
summary and parameters (`params`), torch-free, and imports a loss's class on first use; `heads`
is what every distillation loss shares (the student's heads weighed and summed, CE mixed in,
each part named); one module per loss holds its formula and its class: `kd` (with the
original's variant), `dkd`, `dist` and `feature` (the exits' feature terms); `ce` is the
cross-entropy every training run uses. A new loss is one module here, one entry in
`registry.LOSSES` and its test in tests/losses/. This package may import torch and
`mlkd_cli.core` only, never data/, models/ or the engine (tests/meta/test_layers.py holds it), and
this file imports nothing, so that help and config checks read the registry without torch.
"""
