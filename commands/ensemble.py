"""`mlkd ensemble`: weighted teacher ensembles (fitting lands in a later release)."""

from __future__ import annotations

import typer

from mlkd_cli.console import UserError

app = typer.Typer(help="Build and evaluate weighted teacher ensembles.", no_args_is_help=True)


@app.command("build")
def build() -> None:
    """Fit ensemble weights on held-out data (not available yet)."""
    raise UserError("`mlkd ensemble build` is not available in this version of mlkd yet")
