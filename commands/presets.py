"""`mlkd presets`: the shipped recipes, and what each resolves to."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from mlkd_cli.core.console import OutputOptions, Reporter
from mlkd_cli.presets import available_presets, resolve_preset, resolved_record

from . import options as opt

app = typer.Typer(help="List and show the shipped presets.", no_args_is_help=True)


@app.command("list")
def list_presets(json: opt.Json = False) -> None:
    """The shipped presets with a line about each."""
    rows = []
    for name in available_presets():
        resolved = resolve_preset(name)
        rows.append(
            {
                "name": name,
                "teachers": len(resolved.teachers),
                "student": resolved.distill.student if resolved.distill else None,
                "description": resolved.description,
            }
        )
    report = Reporter(OutputOptions(json=json))
    report.table(
        "presets",
        ["name", "teachers", "student"],
        [[r["name"], r["teachers"], r["student"]] for r in rows],
    )
    for row in rows:
        report.info(f"{row['name']}: {row['description']}")
    report.result({"presets": rows})


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="A shipped preset name or a YAML file.")],
    json: opt.Json = False,
) -> None:
    """The preset resolved: every setting of every command it feeds, defaults filled in."""
    record = resolved_record(resolve_preset(name))
    if json:
        Reporter(OutputOptions(json=True)).result(record)
    else:
        typer.echo(yaml.safe_dump(record, sort_keys=False).rstrip())
