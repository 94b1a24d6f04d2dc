"""Studies: each defines how to build, calibrate, train and diagnose one run of a row.

The registry below is the one list of studies. Each is imported only when asked for
(``get_study``), so a stage that works on one study runs, and depends on (``models.identity``),
that study's code alone. To add a study, write ``models/studies/<name>.py`` with a class
implementing ``Study``, add it here with the prepared data it reads, add its config class to
``models/config/`` and an optional field to ``StudiesConfig``, then `python -m stages.dag`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from models.studies.base import Study, Trainable


@dataclass(frozen=True)
class StudyEntry:
    cls: str                    # the Study class in models/studies/<name>.py
    datasets: tuple[str, ...]   # prepared data it reads: "tokens", "mnist1d", "bridge" (none: generated)
    # row kind -> the module that implements that kind of row, imported only for such a row:
    # a run's code identity (models.identity) is the study's module plus its row's module, so
    # an edit to one kind's module retrains the rows of that kind alone
    # (a str: a template "package.{kind}", one module per kind, found by listing the package)
    row_modules: dict[str, str] | str = field(default_factory=dict)


FF_RULES = "models.ff.rules.{kind}"  # the feed-forward rules: one module per kind

STUDIES: dict[str, StudyEntry] = {
    "eqt_lm": StudyEntry("EqtLMStudy", ("tokens",), {
        "bp": "models.studies.eqt_lm.bp", "bptt": "models.studies.eqt_lm.equilibrium",
        "ep": "models.studies.eqt_lm.equilibrium"}),
    "rules_vision": StudyEntry("RulesVisionStudy", ("mnist1d",), FF_RULES),
    "rules_ladder": StudyEntry("RulesLadderStudy", (), FF_RULES),
    "rules_lq": StudyEntry("RulesLQStudy", (), FF_RULES),
    "pc_seq": StudyEntry("PCSeqStudy", ("tokens",)),
    "dtp_wm": StudyEntry("DTPWMStudy", ("tokens",)),
    "bridge": StudyEntry("BridgeStudy", ("bridge",)),
}

__all__ = ["STUDIES", "Study", "StudyEntry", "Trainable", "get_study", "row_modules",
           "study_datasets"]


def study_datasets(name: str) -> tuple[str, ...]:
    return _entry(name).datasets


def row_modules(name: str, kinds: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The modules of ``kinds`` of rows of study ``name`` (None: of every kind it has)."""
    table = _entry(name).row_modules
    if isinstance(table, str):  # one module per kind in a package: list it for "every kind"
        package = Path(__file__).parents[2].joinpath(*table.split(".")[:-1])
        known = sorted(p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "base"))
        return tuple(sorted({table.format(kind=k) for k in (known if kinds is None else kinds)
                             if k in known}))
    chosen = table if kinds is None else {k: table[k] for k in kinds if k in table}
    return tuple(sorted(set(chosen.values())))


def get_study(name: str) -> Study:
    module = importlib.import_module(f"models.studies.{name}")
    return getattr(module, _entry(name).cls)()


def _entry(name: str) -> StudyEntry:
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; known: {sorted(STUDIES)}")
    return STUDIES[name]
