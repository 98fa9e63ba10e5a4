"""Configuration: typed checks, overrides, YAML safety, round trip through a run dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from loralab.config import Config, config_from_dict, config_reference, dump_config, load_config
from loralab.errors import ConfigError, LoralabError


def test_defaults_load():
    cfg = load_config(None, [])
    assert isinstance(cfg, Config)
    assert cfg.lora.targets == ["attention"]  # q,v, or the fused q,k,v matrix (tests/test_roles.py)
    assert cfg.grad_accum == 1


def test_unknown_key_named():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["lora.rank=4"])
    assert "lora.rank" in str(exc.value)
    assert "unknown key" in str(exc.value)


def test_unknown_section_named():
    with pytest.raises(ConfigError, match="'optim'"):
        config_from_dict({"optim": {"lr": 1}})


def test_wrong_type_named():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["lora.r=abc"])
    msg = str(exc.value)
    assert "lora.r" in msg and "integer" in msg and "'abc'" in msg


def test_out_of_range_named():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["lora.dropout=1.5"])
    assert "lora.dropout must be < 1" in str(exc.value)


def test_r_zero_is_config_error():
    with pytest.raises(ConfigError, match=r"lora\.r must be > 0"):
        load_config(None, ["lora.r=0"])
    with pytest.raises(ConfigError, match=r"lora\.r must be > 0"):
        load_config(None, ["lora.r=-3"])


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["lora.rank=4", "train.lr=fast", "lora.dropout=2", "data.bogus=1"])
    msg = str(exc.value)
    for key in ("lora.rank", "train.lr", "lora.dropout", "data.bogus"):
        assert key in msg
    assert msg.count("\n  - ") == 4


def test_override_parsing():
    cfg = load_config(None, ["lora.targets=query,key", "train.lr=1e-4", "lora.r=4", "output.dir=x/y"])
    assert cfg.lora.targets == ["query", "key"]
    assert cfg.train.lr == pytest.approx(1e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.lora.r == 4
    assert cfg.output.dir == "x/y"


def test_override_list_syntax_and_null():
    cfg = load_config(None, ["lora.targets=[mlp, head]", "train.grad_clip=null"])
    assert cfg.lora.targets == ["mlp", "head"]
    assert cfg.train.grad_clip is None


def test_override_malformed():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["lr=1"])


def test_yaml_file_overridden_by_set(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("lora:\n  r: 16\ntrain:\n  lr: 1e-3\n", encoding="utf-8")
    cfg = load_config(p, ["lora.r=2"])
    assert cfg.lora.r == 2
    assert cfg.train.lr == pytest.approx(1e-3)


def test_batch_not_divisible():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.batch_size=10", "train.micro_batch_size=4"])
    msg = str(exc.value)
    assert "train.batch_size (10)" in msg and "train.micro_batch_size (4)" in msg


def test_grad_accum():
    cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=2"])
    assert cfg.grad_accum == 4


def test_yaml_object_tag_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f'x: !!python/object/apply:os.system ["touch {marker}"]\n', encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value)
    assert "safe_load" in str(exc.value)
    assert not marker.exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(LoralabError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_not_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level"):
        load_config(p)


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, [
        "lora.targets=query,key,mlp", "lora.rslora=true", "train.lr=1e-4", "train.betas=[0.8,0.95]",
        "data.max_response_chars=100", "quant.mode=nf4", "train.grad_clip=null",
    ])
    out = tmp_path / "config.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


def test_readme_configuration_reference_is_current():
    """docs/configuration.md's key table is config_reference()'s output, so a new key can't go undocumented."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert config_reference().strip() in readme


def test_tracking_shorthand_takes_set_and_track(tmp_path):
    """`tracking: [tensorboard]` (the documented shorthand) with --set tracking.* on top, as
    `--track` and api.train(track=...) pass it: it used to fail with "tracking is not a section"."""
    path = tmp_path / "run.yaml"
    path.write_text("tracking: [tensorboard, mlflow]\n", encoding="utf-8")
    assert load_config(path).tracking.backends == ["tensorboard", "mlflow"]
    assert load_config(path, ["tracking.backends=[wandb]"]).tracking.backends == ["wandb"]
    cfg = load_config(path, ["tracking.experiment=mine"])
    assert cfg.tracking.backends == ["tensorboard", "mlflow"] and cfg.tracking.experiment == "mine"
