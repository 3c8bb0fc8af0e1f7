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


def _choice_fields():
    """Every schema field whose value is one of a set of words: (key, its allowed words)."""
    import dataclasses
    import typing

    from ctvlp_dist.config import Config

    out = []
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = typing.get_args(tp)
            elem = args[0] if typing.get_origin(tp) is tuple and args and args[-1] is Ellipsis else tp
            if typing.get_origin(elem) is typing.Literal:
                out.append((f"{sec.name}.{f.name}", typing.get_args(elem), elem is not tp))
    return out


def test_every_word_choice_is_checked_at_load_with_its_allowed_values():
    """A bad word is refused when the config loads, before any work, by an error that lists the
    allowed values; each allowed value loads, alone or as a list element."""
    fields = _choice_fields()
    assert len(fields) >= 20, fields
    for key, allowed, is_list in fields:
        bad = f"{key}=[nope]" if is_list else f"{key}=nope"
        with pytest.raises(ConfigError) as e:
            load_config(None, [bad])
        assert all(str(a) in str(e.value) for a in allowed) and "nope" in str(e.value), (key, str(e.value))
        for a in allowed:
            cfg = load_config(None, [f"{key}=[{a}]" if is_list else f"{key}={a}"])
            section, name = key.split(".")
            got = getattr(getattr(cfg, section), name)
            assert got == ((a,) if is_list else a), (key, got)


def test_a_bad_choice_fails_the_command_before_it_starts(tmp_path):
    from .conftest import ROOT

    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ctvlp_dist", "train", "--data", str(tmp_path), "train.stage=clipp"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "train.stage' must be one of supervised, clip" in r.stderr
    assert "manifest" not in r.stderr  # refused at load, before looking at the data


def test_renamed_key_still_loads_with_a_warning():
    with pytest.warns(FutureWarning, match="'eval.labels' is deprecated; use 'eval.gold'"):
        cfg = load_config(None, ["eval.labels=gold.csv"])
    assert cfg.eval.gold == "gold.csv"


def test_demo_without_config_runs_the_demo_recipe():
    """`ctvlp demo` with no --config resolves exactly to configs/demo.yaml (what make demo, the README
    and the benchmarks describe), flags and overrides on top; DemoConfig's own defaults are that
    recipe's too, so a config without a demo section gets the same demo."""
    import dataclasses

    from ctvlp_dist.cli import DEMO_CONFIG, resolve_config

    recipe = load_config(DEMO_CONFIG)
    assert dataclasses.asdict(resolve_config(["demo"])) == dataclasses.asdict(recipe)
    assert recipe.demo.patients == 1600 and recipe.model.width == 16  # the recipe, not the schema's defaults
    over = resolve_config(["demo", "--out", "elsewhere", "demo.clip_steps=3"])
    assert (over.demo.out, over.demo.clip_steps, over.demo.patients) == ("elsewhere", 3, 1600)
    assert load_config(None).demo == recipe.demo
    other = resolve_config(["demo", "--config", str(DEMO_CONFIG.parent / "train_tiny_cpu.yaml")])
    assert other.demo == recipe.demo and other.model != recipe.model


def test_kernel_tiles_reach_the_model_and_refuse_the_torch_convolution():
    from ctvlp_dist.models import build_model

    cfg = load_config(None, ["kernels.conv_fwd_tile=[64,64,32,4,1]", "model.conv_impl=triton", "model.width=8",
                             "model.stem=k4s4", "model.num_labels=0", "model.latent_dim=8"])
    m = build_model(cfg.model, cfg.kernels)
    tile = m.image.layers[0][0]._fused.keywords["tiles"]("fwd", 100, 64, 64, 64)
    assert (tile["BM"], tile["BN"], tile["BK"]) == (64, 64, 32)
    cfg = load_config(None, ["kernels.conv_fwd_tile=[64,64,32,4,1]", "model.num_labels=0"])
    with pytest.raises(ValueError, match="set model.conv_impl=triton"):
        build_model(cfg.model, cfg.kernels)


def test_a_slurm_time_stays_a_string(tmp_path):
    """YAML 1.1 reads 24:00:00 as the base-60 number 86400 (which sbatch would take as minutes);
    the config reads YAML 1.2's way, in files and overrides alike."""
    f = tmp_path / "c.yaml"
    f.write_text("launch:\n  time: 24:00:00\noptim:\n  lr: 1.0e-4\n")
    assert load_config(f).launch.time == "24:00:00" and load_config(f).optim.lr == 1e-4
    assert load_config(None, ["launch.time=1:30:00", "train.steps=0x10"]).launch.time == "1:30:00"
    assert load_config(None, ["train.steps=0x10"]).train.steps == 16
