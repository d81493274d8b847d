"""The Typer command-line app: one thin module per command."""
