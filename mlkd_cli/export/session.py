"""The one place mlkd opens an ONNX file in onnxruntime (export's checks, int8's calibration and
comparison, the deploy-time AnytimeClassifier, latency timing). Light on import: onnxruntime loads
when a session is opened, so the classifier that imports this stays free of Typer and torch's
exporters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The CPU provider, named: an onnxruntime build with GPU providers would otherwise pick one, and
# the checks against PyTorch, int8's agreement and the timings are all of the CPU's arithmetic.
PROVIDERS = ("CPUExecutionProvider",)


def open_session(path: Path) -> Any:
    """An onnxruntime inference session on the ONNX file at `path`, on the CPU (ImportError
    where onnxruntime is not installed: each caller says what that means for it)."""
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=list(PROVIDERS))
