"""Studies: each defines how to build, calibrate, train and diagnose one run of a row.

To add a study, write ``models/studies/<name>.py`` with a class implementing ``Study`` and register
it in ``STUDIES`` below; add its config class in ``models/config.py``.
"""

from __future__ import annotations

from models.studies.base import Study, Trainer
from models.studies.eqt_lm import EqtLMStudy
from models.studies.rules_ladder import RulesLadderStudy
from models.studies.rules_lq import RulesLQStudy
from models.studies.rules_vision import RulesVisionStudy

STUDIES: dict[str, Study] = {"eqt_lm": EqtLMStudy(), "rules_vision": RulesVisionStudy(),
                             "rules_ladder": RulesLadderStudy(), "rules_lq": RulesLQStudy()}

__all__ = ["STUDIES", "Study", "Trainer", "get_study"]


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; known: {sorted(STUDIES)}")
    return STUDIES[name]
