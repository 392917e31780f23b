"""Typer command modules, one per group (installed as mlkd_cli.commands)."""
