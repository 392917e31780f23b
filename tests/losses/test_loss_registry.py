"""The loss registry (`mlkd_cli/losses/registry.py`): read without torch, and every entry's class
loads and declares what its entry says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlkd_cli.losses.feature import FeatureTerms
from mlkd_cli.losses.heads import MultiExitLoss
from mlkd_cli.losses.registry import FORMER_NAMES, LOSSES, loss_class, loss_param_problem

# What help and config checks read from the registry, in a fresh interpreter: nothing of it may
# bring in torch (or timm, or numpy), or `mlkd --help` pays for them.
PROBE = """
import json, sys
from mlkd_cli.losses.registry import FORMER_NAMES, LOSSES, loss_param_problem, loss_spec
listing = {n: [s.SUMMARY, s.has_features(), s.adds_to_ce(), [p.name for p in s.PARAMS]]
           for n, s in LOSSES.items()}
problem = loss_param_problem("kd", {"nckd_weight": 4.0})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "numpy"))
print(json.dumps({"listing": listing, "problem": problem, "heavy": heavy,
                  "former": loss_spec("multi_exit_kd").SUMMARY}))
"""


def test_the_registry_is_read_without_importing_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(done.stdout)
    assert seen["heavy"] == []
    assert list(seen["listing"]) == list(LOSSES)
    assert seen["listing"]["dkd+feature"][1:3] == [True, True]
    assert "nckd_weight" in seen["listing"]["dkd"][3]
    assert "belongs to dkd, dkd+feature" in seen["problem"]
    assert seen["former"] == LOSSES["kd"].SUMMARY


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_entry_loads_a_loss_declaring_the_entrys_parameters(name: str) -> None:
    spec = LOSSES[name]
    cls = loss_class(name)
    assert issubclass(cls, MultiExitLoss)
    assert cls.PARAMS == spec.PARAMS
    assert cls.has_features() == spec.has_features() == issubclass(cls, FeatureTerms)
    assert cls.adds_to_ce() == spec.adds_to_ce()
    defaults = {p.name: p.default for p in spec.PARAMS}
    assert spec(4.0, 0.9, [1.0]).params == defaults


def test_former_names_build_the_loss_they_name_and_refuse_as_it_does() -> None:
    for former, name in FORMER_NAMES.items():
        assert loss_class(former) is loss_class(name)
        assert loss_param_problem(former, {"tau": 1.0}) is not None
    assert loss_param_problem("dist", {"tau": 0.5, "ce_weight": 0.0}) is None
