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


def open_session(path: Path, spinning: bool = True) -> Any:
    """An onnxruntime inference session on the ONNX file at `path`, on the CPU (ImportError
    where onnxruntime is not installed: each caller says what that means for it).

    `spinning=False` for sessions that run one after another (a staged export's segments): a
    session's threads otherwise spin on after each run, waiting for more work, and take the
    cores from the next session (measured: four chained segments 3.5x slower than with it off).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=list(PROVIDERS))
