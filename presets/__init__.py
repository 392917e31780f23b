"""Shipped YAML presets (installed as mlkd_cli.shipped_presets)."""
