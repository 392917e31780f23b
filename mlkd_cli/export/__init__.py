"""Export: a trained classifier or a student with exits as files that run without mlkd.
`exporter` is what `mlkd export` does (destinations checked before any work, then each format);
the formats are `safetensors_folder` (timm's hub folder, or weights + exits.json), `onnx_graph`
(plain, or one output per exit; card and exits record in the metadata), `staged_onnx` (beside a
student's ONNX file, one file per segment and a manifest, so onnxruntime stops early too; its
reader and runner) and `torchscript`; each is checked against PyTorch by `verify` before it is
placed. `int8_plan` checks --int8's flags, target CPU and data up front, `int8` quantizes and
compares (`staged_int8`: each segment), `agreement` decides whether the int8 file is kept.
`session` is the one onnxruntime session opener, which the deploy-time
`anytime` classifier and timing import too. These modules may import `core`, `data`, `models`,
the pure parts of `anytime` (rules) and the passes over a split; never `commands`, Typer or
rich. This file imports nothing at load (the names below load on first use), so importing
`mlkd_cli.export.session` stays light and `--help` never loads torch or onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlkd_cli.export.exporter import (
        EXITS_FORMATS,
        check_destination,
        default_output,
        export_any,
        export_checkpoint,
        export_exits_checkpoint,
        written_files,
    )
    from mlkd_cli.export.int8_plan import Int8Options
    from mlkd_cli.export.onnx_graph import head_output_names
    from mlkd_cli.export.safetensors_folder import timm_config
    from mlkd_cli.export.session import open_session
    from mlkd_cli.export.verify import TOLERANCE

__all__ = [
    "EXITS_FORMATS",
    "TOLERANCE",
    "Int8Options",
    "check_destination",
    "default_output",
    "export_any",
    "export_checkpoint",
    "export_exits_checkpoint",
    "head_output_names",
    "open_session",
    "timm_config",
    "written_files",
]
_EXPORTER = {
    "EXITS_FORMATS",
    "check_destination",
    "default_output",
    "export_any",
    "export_checkpoint",
    "export_exits_checkpoint",
    "written_files",
}


def __getattr__(name: str) -> Any:
    # Lazy: the exporter pulls in torch and the models; the session opener must not.
    if name in _EXPORTER:
        from mlkd_cli.export import exporter as module
    elif name == "Int8Options":
        from mlkd_cli.export import int8_plan as module
    elif name == "TOLERANCE":
        from mlkd_cli.export import verify as module
    elif name == "head_output_names":
        from mlkd_cli.export import onnx_graph as module
    elif name == "timm_config":
        from mlkd_cli.export import safetensors_folder as module
    elif name == "open_session":
        from mlkd_cli.export import session as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
