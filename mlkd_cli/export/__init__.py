"""Export: a trained classifier or a student with exits as files that run without mlkd
(`exporter`: safetensors, ONNX, TorchScript; `int8`: int8 ONNX). Imports nothing at load: the
exporter's names load on first use, so `--help` never loads torch or onnx.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: the exporter pulls in torch and the models.
    from mlkd_cli.export import exporter

    return getattr(exporter, name)
