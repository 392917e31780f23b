"""Shipped YAML presets (installed as mlkd_cli.presets)."""
