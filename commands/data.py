"""`mlkd data`: which datasets mlkd knows, and what is on disk for one of them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlkd_cli.core.console import OutputOptions, Reporter
from mlkd_cli.core.safeload import clip

from . import options as opt

app = typer.Typer(help="List datasets and inspect their files.", no_args_is_help=True)


@app.command("list")
def list_datasets(
    data_dir: opt.DataDir = None,
    json: opt.Json = False,
) -> None:
    """The registered datasets: classes, splits and where each looks for its files."""
    from mlkd_cli.data.registry import DATASETS, PREFIXED_SPLITS, PREFIXES

    root = data_dir or Path("data")
    rows = [
        {
            "name": spec.name,
            "classes": spec.num_classes,
            "splits": spec.splits,
            "looks_in": spec.looks_in(root),
            "description": spec.description,
        }
        for spec in DATASETS.values()
    ] + [
        {
            "name": f"{prefix}/{'FOLDER' if prefix == 'wds' else 'NAME'}",
            "classes": None,
            "splits": PREFIXED_SPLITS,
            "looks_in": "the folder named (or under --data-dir)"
            + (", else the Hub" if prefix == "hfds" else ""),
            "description": description,
        }
        for prefix, description in PREFIXES.items()
    ]
    report = Reporter(OutputOptions(json=json))
    report.table(
        "datasets",
        ["name", "classes", "splits", "looks in"],
        [[r["name"], r["classes"] or "from files", r["splits"], r["looks_in"]] for r in rows],
    )
    report.info("val is held out of the training images with a fixed seed (--val-fraction)")
    report.result({"datasets": rows})


@app.command("info")
def info(
    name: Annotated[str, typer.Argument(help="Dataset name (see `mlkd data list`).")],
    data_dir: opt.DataDir = None,
    download: opt.Download = None,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction", help="Share of training data held out.", rich_help_panel=opt.DATA
        ),
    ] = 0.1,
    json: opt.Json = False,
) -> None:
    """Images per split and a few class names; says where the files should be when absent."""
    from mlkd_cli.data.registry import get_dataset_spec, load_splits

    spec = get_dataset_spec(name)
    root = data_dir or Path("data")
    splits = load_splits(name, root, bool(download), val_fraction)
    counts = splits.counts()
    report = Reporter(OutputOptions(json=json))
    shown = ", ".join(splits.class_names[:5]) + (", ..." if splits.num_classes > 5 else "")
    report.table(
        clip(name, 40),
        ["split", "images"],
        [[split, "absent" if n is None else n] for split, n in counts.items()],
    )
    report.info(f"files: {spec.looks_in(root)}")
    report.info(f"{splits.num_classes} classes: {shown}")
    if splits.val is splits.train:
        report.info(f"val: {val_fraction:g} of train, held out with a fixed seed (--val-fraction)")
    report.result(
        {
            "name": name,
            "looks_in": spec.looks_in(root),
            "classes": splits.num_classes,
            "class_names": splits.class_names,
            "counts": counts,
        }
    )
