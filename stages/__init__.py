"""One typer CLI per pipeline stage: ``python -m stages.<name> --help``. Thin over ``models``."""
