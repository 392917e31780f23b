"""Typer command modules, one per group (installed as mlkd_cli.commands).

Each command declares its flags once, as the `Annotated` fields of a typed request dataclass
(`requests.py`: the shared groups and `takes`; `options.py`: the flags several commands share
and the help panels), turns the request into a config or a job, calls the engine or a pass, and
renders the result. A module here imports, at its top, only what declaring its flags needs:
typer, core/, the config dataclasses (their defaults are the help's), presets.py and plain
constants. The engine, torch and timm are imported inside the command function, so `--help` and
usage errors never load them (tests/cli/test_help.py holds this).
"""
