"""Bad params get one clear message naming the key and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from models.config import ConfigError, load_params, validate_params
from tests.conftest import ROOT, stage, tiny_params


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate_params(raw)
    return str(err.value)


def test_default_params_and_profiles_validate() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.enabled_studies()
    for profile in (ROOT / "profiles").glob("*.yaml"):
        load_params(ROOT / "params.yaml", profile=profile.stem)


def test_unknown_key_names_key_and_allowed() -> None:
    msg = _error(tiny_params({"studies": {"eqt_lm": {"train": {"lrr": 0.1}}}}))
    assert "studies.eqt_lm.train.lrr" in msg
    assert "allowed here" in msg and "lr" in msg and "segment_steps" in msg


def test_unknown_top_level_key() -> None:
    msg = _error(tiny_params({"sedes": [1]}))
    assert "'sedes'" in msg and "seeds" in msg


def test_wrong_type_names_key_and_value() -> None:
    msg = _error(tiny_params({"studies": {"eqt_lm": {"train": {"lr": "fast"}}}}))
    assert "studies.eqt_lm.train.lr" in msg and "'fast'" in msg


@pytest.mark.parametrize("override, needle", [
    ({"studies": {"eqt_lm": {"train": {"min_lr": 1.0, "lr": 0.1}}}}, "min_lr"),
    ({"studies": {"eqt_lm": {"model": {"n_embd": 30, "n_head": 4}}}}, "divisible"),
    ({"studies": {"eqt_lm": {"rows": ["nope"]}}}, "not defined under rules"),
    ({"data": {"text": {"source": "file"}}}, "data.text.path"),
    ({"device": "tpu"}, "device"),
    ({"studies": {"eqt_lm": {"train": {"steps": 0}}}}, "steps"),
    # counted in epochs: a step count would be replaced silently, so it is refused
    ({"studies": {"rules_ladder": {"train": {"segment_steps": 360}}}}, "segment_epochs"),
    ({"studies": {"rules_vision": {"rules": {"dfa": {"train": {"steps": 9}}}}}},
     "rules.dfa.train.steps"),
])
def test_impossible_values(override: dict, needle: str) -> None:
    assert needle in _error(tiny_params(override))


def test_missing_profile_lists_available() -> None:
    with pytest.raises(ConfigError, match="available"):
        load_params(ROOT / "params.yaml", profile="no-such-profile")


def test_cli_bad_params_exit_2_one_message_no_outputs(project) -> None:
    raw = tiny_params({"studies": {"eqt_lm": {"train": {"bogus": 1}}}})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    result = stage("stages.prepare", check=False)
    assert result.returncode == 2
    assert "error:" in result.stderr and "bogus" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data").exists()


def test_profile_key_overrides_and_precedence(tmp_path, monkeypatch) -> None:
    """params.yaml < the profile it names < overrides; an override with an unknown key fails."""
    (tmp_path / "profiles").mkdir()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**base, "profile": "p", "seeds": [7]}))
    (tmp_path / "profiles" / "p.yaml").write_text("seeds: [1, 2]\nthreads: 2\n")
    monkeypatch.delenv("BPFREE_PROFILE", raising=False)
    monkeypatch.delenv("BPFREE_OVERRIDES", raising=False)
    params = load_params(tmp_path / "params.yaml")
    assert params.profile == "p" and params.seeds == [1, 2] and params.threads == 2
    params = load_params(tmp_path / "params.yaml", overrides={"seeds": [3]})
    assert params.seeds == [3] and params.threads == 2
    monkeypatch.setenv("BPFREE_OVERRIDES", '{"studies": {"eqt_lm": {"train": {"lr": 0.002}}}}')
    assert load_params(tmp_path / "params.yaml").studies.eqt_lm.train.lr == 0.002
    monkeypatch.setenv("BPFREE_OVERRIDES", '{"studies": {"eqt_lm": {"train": {"lrr": 1}}}}')
    with pytest.raises(ConfigError, match=r"overrides: unknown key 'studies.eqt_lm.train.lrr'"):
        load_params(tmp_path / "params.yaml")
    monkeypatch.delenv("BPFREE_OVERRIDES")
    (tmp_path / "profiles" / "p.yaml").write_text("profile: q\n")
    with pytest.raises(ConfigError, match="cannot name another profile"):
        load_params(tmp_path / "params.yaml")


def test_snakemake_config_becomes_only_the_changed_keys() -> None:
    from models.config.params import changed_keys

    raw = {"profile": "default", "seeds": [0], "studies": {"a": {"train": {"lr": 1, "steps": 2}}}}
    merged = {"profile": "tiny", "seeds": [0], "studies": {"a": {"train": {"lr": 3, "steps": 2}}}}
    assert changed_keys(merged, raw) == {"profile": "tiny", "studies": {"a": {"train": {"lr": 3}}}}
