"""The DAG's vocabulary: which runs exist and where every artifact lives.

Snakefile, dvc.yaml and the stages all take paths from here, so the two front-ends and the code
agree on one layout:

    data/text/{train,val}.txt, meta.json          prepare
    data/tokens/{train,val}.bin, tokenizer.json   bpe
    data/mnist1d/data.npz                         prepare --dataset mnist1d
    runs/<study>/<row>/calibration.json           calibrate
    runs/<study>/<row>/seed<k>/ckpt/seg<i>.pt     train (one file per segment)
    runs/<study>/<row>/seed<k>/log/seg<i>.jsonl   train (the segment's logged rows)
    runs/<study>/<row>/seed<k>/diagnostics.json   diagnose
    reports/FINDINGS.md, metrics.json, figures/   report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config import Params, fingerprint

DATA = Path("data")
RUNS = Path("runs")
REPORTS = Path("reports")


@dataclass(frozen=True)
class RunSpec:
    study: str
    row: str
    seed: int

    @property
    def row_dir(self) -> Path:
        return RUNS / self.study / self.row

    @property
    def dir(self) -> Path:
        return self.row_dir / f"seed{self.seed}"

    @property
    def calibration(self) -> Path:
        return self.row_dir / "calibration.json"

    @property
    def ckpt_dir(self) -> Path:
        return self.dir / "ckpt"

    @property
    def log_dir(self) -> Path:
        return self.dir / "log"

    def ckpt(self, index: int) -> Path:
        return self.ckpt_dir / f"seg{index:04d}.pt"

    def log(self, index: int) -> Path:
        return self.log_dir / f"seg{index:04d}.jsonl"

    @property
    def diagnostics(self) -> Path:
        return self.dir / "diagnostics.json"

    def name(self) -> str:
        return f"{self.study}/{self.row}/seed{self.seed}"


def text_dir() -> Path:
    return DATA / "text"


def tokens_dir() -> Path:
    return DATA / "tokens"


def mnist1d_file() -> Path:
    return DATA / "mnist1d" / "data.npz"


def runs(params: Params) -> list[RunSpec]:
    """Every (study, row, seed) the params ask for, in a stable order."""
    return [
        RunSpec(study, row, seed)
        for study in params.enabled_studies()
        for row in params.study(study).rows
        for seed in params.seeds
    ]


def run_config(params: Params, spec: RunSpec) -> dict[str, Any]:
    """The fully resolved configuration of one run (what its checkpoints are made with)."""
    study = params.study(spec.study)
    return {
        "study": spec.study,
        "row": spec.row,
        "seed": spec.seed,
        "device": params.device,
        "data": params.data.model_dump(),
        "model": study.row_model(spec.row).model_dump(),
        "train": study.row_train(spec.row).model_dump(),
        "rule": study.rules[spec.row].model_dump(exclude={"train", "model"}),
        **({"task": study.task.model_dump()} if hasattr(study, "task") else {}),
    }


def training_fingerprint(params: Params, spec: RunSpec) -> str:
    """Hash of what determines the trained weights up to any step.

    ``steps`` is excluded (the schedule ignores it) and so are evaluation-only settings, so raising
    ``steps`` keeps finished segments valid while any change that alters training invalidates them.
    """
    cfg = run_config(params, spec)
    for key in ("steps", "eval_every", "eval_batches", "log_every", "live_guard"):
        cfg["train"].pop(key)
    cfg.pop("device")
    return fingerprint(cfg)


# The code each stage's outputs depend on (both front-ends declare it, so a code change re-runs
# exactly the stages it can affect). Directories stand for every .py file under them.
STAGE_CODE: dict[str, list[str]] = {
    "prepare": ["stages/prepare.py", "models/data/stories.py", "models/data/sources.py"],
    "prepare_mnist1d": ["stages/prepare.py", "models/ff/tasks/mnist1d.py"],
    "bpe": ["stages/bpe.py", "models/data/tokens.py"],
    "calibrate": ["stages/calibrate.py", "models/studies", "models/nets", "models/eqt",
                  "models/ff", "models/config"],
    "train": ["stages/train.py", "models/studies", "models/nets", "models/eqt", "models/ff",
              "models/training", "models/config"],
    "diagnose": ["stages/diagnose.py", "models/studies", "models/nets", "models/eqt", "models/ff",
                 "models/health"],
    "report": ["stages/report.py", "models/report"],
}


def code_files(stage: str, root: Path = Path(".")) -> list[str]:
    """STAGE_CODE expanded to files (Snakemake tracks files; DVC hashes directories itself)."""
    files: list[str] = []
    for entry in STAGE_CODE[stage]:
        path = root / entry
        files += sorted(str(p.relative_to(root)) for p in path.rglob("*.py")) if path.is_dir() \
            else [entry]
    return files
