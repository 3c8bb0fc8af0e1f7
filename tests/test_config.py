import pytest

from ctvlp_dist.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loader:\n  batch_size: 3\n  crop: [8, 16, 16]\nshard:\n  codec: lz4\n")
    cfg = load_config(p, ["loader.batch_size=5", "preprocess.spacing=[2, 1, 1]", "synth.shape=null"])
    assert cfg.loader.batch_size == 5  # override wins over the file
    assert cfg.loader.crop == (8, 16, 16) and cfg.shard.codec == "lz4"
    assert cfg.preprocess.spacing == (2.0, 1.0, 1.0) and isinstance(cfg.preprocess.spacing[0], float)
    assert cfg.synth.shape is None


@pytest.mark.parametrize("key,near", [("loader.batchsize", "loader.batch_size"),
                                      ("synth.patient", "synth.patients"),
                                      ("shard.codc", "shard.codec")])
def test_unknown_key_names_nearest(key, near):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=1"])
    assert f"'{key}'" in str(e.value) and f"'{near}'" in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lodaer:\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match="'lodaer'.*did you mean"):
        load_config(p)


@pytest.mark.parametrize("item,msg", [("loader.batch_size=abc", "expects int"),
                                      ("loader.crop=[1,2]", "expects 3 values"),
                                      ("loader.shuffle=maybe", "true/false"),
                                      ("noequals", "section.key=value")])
def test_bad_values(item, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [item])


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files, "configs/ ships no YAML"
    for f in files:
        load_config(f)


def test_include_applies_the_base_file_first(tmp_path):
    from ctvlp_dist.config import load_config

    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    cfg = load_config(root / "train_clip_seed.yaml")
    assert cfg.model.stem == "k2s2" and cfg.model.norm == "bn"  # from model_r3d18_seed.yaml
    assert cfg.optim.lr == 1e-5 and cfg.loader.crop == (96, 192, 192) and cfg.train.stage == "clip"
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
