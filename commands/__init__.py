"""Typer command modules, one per group (installed as mlkd_cli.commands).

A module here imports, at its top, only what declaring its flags needs: typer, core/, the config
dataclasses (their defaults are the help's) and plain constants. The engine, torch and timm are
imported inside the command function, so `--help` and usage errors never load them
(tests/cli/test_help.py holds this).
"""
