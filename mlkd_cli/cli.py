"""The `mlkd` root app: command groups, --version, and how errors reach the terminal."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click; its exceptions are what the app raises
    from typer._click import exceptions as click_errors
    from typer._click.termui import echo
except ImportError:  # older typer runs on click itself
    from click import echo
    from click import exceptions as click_errors

from mlkd_cli.core.cpus import prefer_short_spin

# Before torch loads (when a command runs; help and usage errors never load it): OpenMP reads
# its spin count once.
prefer_short_spin()

from mlkd_cli import __version__  # noqa: E402
from mlkd_cli.commands import (  # noqa: E402
    data,
    distill,
    ensemble,
    evaluate,
    export,
    pipeline,
    presets,
    study,
    teacher,
)
from mlkd_cli.core.console import new_run  # noqa: E402
from mlkd_cli.core.errors import RunInterrupted, RunStopped, UserError  # noqa: E402
from mlkd_cli.core.invocation import record_invocation  # noqa: E402


class MlkdGroup(TyperGroup):
    """Root group whose errors are one line on stderr with exit code 2, never a traceback.

    Usage errors from click (bad flag, bad value) and mlkd's own UserError are both mistakes the
    user can fix; anything else is a bug and keeps its traceback.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        kwargs.setdefault("prog_name", "mlkd")
        record_invocation(args[0] if args else kwargs.get("args"))
        new_run()  # lines said once a run (the precision) are said again by this command
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            code = _fail(f"{exc.format_message()}{hint}", exc.exit_code)
        except UserError as exc:
            code = _fail(str(exc), 2)
        except RunInterrupted as exc:
            code = _fail(str(exc), 128 + exc.signum)
        except RunStopped as exc:
            code = _fail(str(exc), 1)
        except click_errors.ClickException as exc:
            code = _fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            code = _fail("aborted", 130)
        else:
            code = result if isinstance(result, int) else 0
            if code == 130:  # typer turns Ctrl-C into exit code 130
                _fail(
                    "interrupted; a training run continues from its last saved state with --resume",
                    130,
                )
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int) -> int:
    echo(f"mlkd: error: {message}", err=True)
    return code


app = typer.Typer(
    cls=MlkdGroup,
    name="mlkd",
    help="Multi-level knowledge distillation: small, fast image classifiers from big teachers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mlkd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Multi-level knowledge distillation: small, fast image classifiers from big teachers."""


app.add_typer(teacher.app, name="teacher")
app.add_typer(ensemble.app, name="ensemble")
app.command("distill", help=distill.distill.__doc__)(distill.distill)
app.command("eval", help=evaluate.evaluate.__doc__)(evaluate.evaluate)
app.command("export", help=export.export.__doc__)(export.export)
app.command("pipeline", help=pipeline.pipeline.__doc__)(pipeline.pipeline)
app.command("study", help=study.study.__doc__)(study.study)
app.add_typer(data.app, name="data")
app.add_typer(presets.app, name="presets")


def main() -> None:
    """Console-script entry point."""
    app()
