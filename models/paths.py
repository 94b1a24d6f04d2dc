"""Where every artifact of the DAG lives: the run specification and the path helpers.

Apart from ``models.pipeline`` (which also knows the studies and the identities) so that a module
the registry of studies imports, such as ``models.studies.base``, can name a ``RunSpec`` without
importing the pipeline back. Paths are relative to the project root, where the stages run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATA = Path("data")
RUNS = Path("runs")
REPORTS = Path("reports")
STAGE_DIRS = ("calibration", "train", "diagnostics")


@dataclass(frozen=True)
class RunSpec:
    study: str
    row: str
    seed: int

    @property
    def dir(self) -> Path:
        """The run directory: checkpoints and logs (self-contained, can be copied elsewhere)."""
        return RUNS / self.study / "train" / self.row / f"seed{self.seed}"

    @property
    def calibration(self) -> Path:
        return calibration_file(self.study, self.row)

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
        return RUNS / self.study / "diagnostics" / self.row / f"seed{self.seed}.json"

    def name(self) -> str:
        return f"{self.study}/{self.row}/seed{self.seed}"


def study_dir(study: str, stage: str) -> Path:
    """runs/<study>/<stage> for stage in calibration, train, diagnostics."""
    return RUNS / study / stage


def calibration_file(study: str, row: str) -> Path:
    return study_dir(study, "calibration") / f"{row}.json"


def text_dir(data: Path = DATA) -> Path:
    return data / "text"


def tokens_dir(data: Path = DATA) -> Path:
    return data / "tokens"


def mnist1d_file(data: Path = DATA) -> Path:
    return data / "mnist1d" / "data.npz"


def bridge_dir(data: Path = DATA) -> Path:
    """The bridge study's corpus meta and its two pretrained LMs (``models.bridge.data``)."""
    return data / "bridge"


def dataset_files(dataset: str) -> list[Path]:
    """The prepared files of a dataset a study reads (what its identity hashes)."""
    return {
        "tokens": [tokens_dir() / n for n in ("meta.json", "tokenizer.json", "train.bin", "val.bin")],
        "mnist1d": [mnist1d_file()],
        "bridge": [bridge_dir() / n for n in ("lms.pt", "meta.json")],
    }[dataset]
