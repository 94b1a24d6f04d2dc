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

from models.studies.base import Study, Trainable


@dataclass(frozen=True)
class StudyEntry:
    cls: str                    # the Study class in models/studies/<name>.py
    datasets: tuple[str, ...]   # prepared data it reads: "tokens", "mnist1d" (none: generated)
    # row kind -> the module that implements that kind of row, imported only for such a row:
    # a run's code identity (models.identity) is the study's module plus its row's module, so
    # an edit to one kind's module retrains the rows of that kind alone
    row_modules: dict[str, str] = field(default_factory=dict)


STUDIES: dict[str, StudyEntry] = {
    "eqt_lm": StudyEntry("EqtLMStudy", ("tokens",), {
        "bp": "models.studies.eqt_lm.bp", "bptt": "models.studies.eqt_lm.equilibrium",
        "ep": "models.studies.eqt_lm.equilibrium"}),
    "rules_vision": StudyEntry("RulesVisionStudy", ("mnist1d",)),
    "rules_ladder": StudyEntry("RulesLadderStudy", ()),
    "rules_lq": StudyEntry("RulesLQStudy", ()),
    "pc_seq": StudyEntry("PCSeqStudy", ("tokens",)),
    "dtp_wm": StudyEntry("DTPWMStudy", ("tokens",)),
}

__all__ = ["STUDIES", "Study", "StudyEntry", "Trainable", "get_study", "row_modules",
           "study_datasets"]


def study_datasets(name: str) -> tuple[str, ...]:
    return _entry(name).datasets


def row_modules(name: str, kinds: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The modules of ``kinds`` of rows of study ``name`` (None: of every kind it has)."""
    table = _entry(name).row_modules
    chosen = table if kinds is None else {k: table[k] for k in kinds if k in table}
    return tuple(sorted(set(chosen.values())))


def get_study(name: str) -> Study:
    module = importlib.import_module(f"models.studies.{name}")
    return getattr(module, _entry(name).cls)()


def _entry(name: str) -> StudyEntry:
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; known: {sorted(STUDIES)}")
    return STUDIES[name]
