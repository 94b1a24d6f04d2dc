"""Stage 6: aggregate every run into reports/FINDINGS.md (+ metrics.json for `dvc exp show`)."""

from __future__ import annotations

from pathlib import Path

from models.pipeline import runs
from models.report.findings import build_report
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(params: Path = PARAMS_OPTION) -> None:
    """Write reports/FINDINGS.md, reports/metrics.json and reports/figures/*.png.

    Tables show mean ± sample std over seeds with n, per study row; each table lists the run
    directories and training-config fingerprints behind it, and the report names the git commit.
    """
    cfg = load(params)
    specs = runs(cfg)
    missing = [str(s.diagnostics) for s in specs if not s.diagnostics.is_file()]
    if missing:
        raise FileNotFoundError(f"diagnostics missing for {len(missing)} runs, e.g. {missing[0]}; "
                                "run the diagnose stage (snakemake/dvc do it for you)")
    build_report(cfg, specs)
    print("report: reports/FINDINGS.md, reports/metrics.json")


if __name__ == "__main__":
    cli()
