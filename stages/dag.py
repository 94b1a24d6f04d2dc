"""Write dvc.yaml from the one DAG definition (models/dag.py), or check it is current.

Run it after adding a study or changing which modules a stage imports; `make test` fails while
the committed dvc.yaml is stale.
"""

from __future__ import annotations

from pathlib import Path

import typer

from models import io
from models.config.params import read_yaml
from models.dag import DVC_YAML, render_dvc_yaml
from stages._cli import PARAMS_OPTION, app, clear_errors

cli = app(__doc__ or "")


OUT_OPTION = typer.Option(DVC_YAML, help="Where to write.")


class StaleDag(ValueError):
    """dvc.yaml differs from what models/dag.py generates."""


@cli.command()
@clear_errors
def main(check: bool = typer.Option(False, help="Exit 2 if dvc.yaml is stale; write nothing."),
         params: Path = PARAMS_OPTION, out: Path = OUT_OPTION) -> None:
    """Generate dvc.yaml for the studies in params.yaml."""
    text = render_dvc_yaml(read_yaml(params))
    current = out.read_text(encoding="utf-8") if out.is_file() else ""
    if check:
        if current != text:
            raise StaleDag(f"{out} is stale: run `python -m stages.dag` and commit it")
        print(f"{out} is current")
        return
    if current != text:
        io.write_text(out, text)
    print(f"dag: wrote {out}" if current != text else f"dag: {out} unchanged")


if __name__ == "__main__":
    cli()
