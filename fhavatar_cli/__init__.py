"""Thin Typer command-line interface over :mod:`pipelines` (no model code here)."""
