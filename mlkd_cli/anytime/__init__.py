"""Early exit (anytime inference), all of it: a student with exits answering an easy image at an
early stage. `rules` (how sure a head is; where an image leaves; the rule registry), `costs`
(MACs per image of each part), `staged` (the backbone cut at its exits, run stage by stage),
`thresholds` (threshold search: operating points and frontiers from every head's logits),
`certify` (thresholds certified on new images at a risk: Learn-then-Test), `evaluation` (the
`mlkd eval` job on an exits checkpoint), `timing` (throughput and latency on this machine) and
`classifier` (the deploy-time `AnytimeClassifier`). The exit heads are built in
`models/student.py` and the exits file format lives in `models/exits.py`. `rules`, `costs` and
`staged` sit in the models layer (the file format records a rule and counted MACs): they import
only torch, `core` and `models.student`. The rest may also import `data`, `engine` (precision,
launch) and `passes` (a pass over a split), never `commands`, Typer or rich. This file imports
nothing, so `from mlkd_cli.anytime import AnytimeClassifier` loads the classifier only when
asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlkd_cli.anytime.classifier import AnytimeClassifier, AnytimePrediction

__all__ = ["AnytimeClassifier", "AnytimePrediction"]


def __getattr__(name: str) -> Any:
    # Lazy: models/exits.py imports the light parts (rules, costs, staged), and the classifier
    # imports models/exits.py; loading it here eagerly would make that a cycle.
    if name in __all__:
        from mlkd_cli.anytime import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
