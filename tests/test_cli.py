"""The `ctvlp` command line: help for every command, friendly errors, demo and bench run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctvlp_dist.config import load_config

CTVLP = str(Path(sys.executable).parent / "ctvlp")
COMMANDS = ["synth", "shard", "verify", "label", "bench", "demo", "config", "train", "eval"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    return subprocess.run([CTVLP, *args], capture_output=True, text=True, timeout=timeout)


def test_top_level_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for c in COMMANDS:
        assert f"\n    {c} " in r.stdout


def test_version_is_the_package_version():
    from ctvlp_dist import __version__
    from importlib.metadata import version
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ctvlp {__version__}"
    assert version("ctvlp_dist") == __version__  # setup.py reads the same string


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: ctvlp " + cmd in r.stdout


@pytest.mark.parametrize("cmd,sections", [("synth", ["synth"]), ("shard", ["ingest", "shard", "preprocess"]),
                                          ("bench", ["bench", "kernels"]), ("label", ["label"]),
                                          ("train", ["train", "optim", "kernels"]),
                                          ("eval", ["eval"]), ("demo", ["demo"])])
def test_help_lists_its_keys_as_valid_overrides(cmd, sections):
    """Each `section.key=value` a command's help shows, passed back as an override, loads as the default."""
    text = " ".join(run(cmd, "--help").stdout.split())
    text = text[text.index("Keys, with their defaults: "):]
    alt = "|".join(sections)
    listed = re.findall(rf"((?:{alt})\.\w+)=(.+?)(?=, (?:{alt})\.|\. Every command)", text)
    defaults = load_config(None, [])
    assert {k for k, _ in listed} == {f"{s}.{f}" for s in sections for f in vars(getattr(defaults, s))}
    for key, value in listed:
        section, name = key.split(".")
        loaded = load_config(None, [f"{key}={value}"])
        assert getattr(getattr(loaded, section), name) == getattr(getattr(defaults, section), name), key


def test_errors_say_what_to_do(tmp_path):
    r = run("synth", "--out", str(tmp_path), "synth.patinets=3")
    assert r.returncode == 2 and "did you mean 'synth.patients'" in r.stderr
    r = run("shard", "--images", str(tmp_path))
    assert r.returncode == 2 and "needs --reports" in r.stderr
    r = run("verify", str(tmp_path))
    assert r.returncode == 1 and "manifest.json not found" in r.stdout


def test_config_show_and_keys():
    r = run("config", "show", "loader.batch_size=7")
    assert r.returncode == 0 and "batch_size: 7" in r.stdout
    r = run("config", "keys")
    assert "loader.batch_size" in r.stdout.split()


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # the demo labels through Ray actors
def test_demo_runs(tmp_path):
    """A smaller version of the demo's whole path, every stage for real (96 patients, vLLM on 2
    reports, 50 supervised and 5 CLIP steps on 2 Ray workers), that a broken pipeline would fail:
    the supervised loss falls by a clear margin, each stage trains at its own learning rate, the
    locked image tower comes out of the CLIP stage unchanged, and the exported model reloads
    and embeds. (At this size zero-shot AUC is not reliably above chance in test time: 0.48 on 19
    scans; the full demo's bar is on the results page.)"""
    import torch

    from ctvlp_dist.models.export import load_exported

    out = tmp_path / "demo"
    r = run("demo", "--out", str(out), "--quiet", "demo.patients=96", "demo.vllm_reports=2",
            "demo.supervised_steps=50", "demo.clip_steps=5", "eval.bootstrap=20", timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    rows = {s: [json.loads(x) for x in (out / s / "metrics.jsonl").read_text().splitlines()] for s in ("supervised", "clip")}
    sup = [x["loss"] for x in rows["supervised"]]
    assert len(sup) == 50 and sum(sup[-10:]) / 10 < 0.85 * sum(sup[:5]) / 5, sup  # measured: 0.675 -> 0.512
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert rows["clip"][0]["lr"] / rows["supervised"][0]["lr"] == pytest.approx(cfg.demo.clip_lr / cfg.optim.lr)
    assert set(m["demo"]["label_quality"]) == {"rules", "vllm"} and m["demo"]["label_quality"]["rules"]["macro_auc"] > 0.8
    test_split = json.loads((out / "data" / "manifest.json").read_text())["splits"]["test"]
    assert m["labels_source"] == "gold" and m["samples"] == len(test_split["patients"])  # one scan per patient
    a, b = load_exported(out / "supervised" / "model.safetensors"), load_exported(out / "clip" / "model.safetensors")
    for (name, pa), pb in zip(a.image.state_dict().items(), b.image.state_dict().values()):
        assert torch.equal(pa, pb), name  # train.lock_image: the tower (BN statistics too) is the supervised one
    with torch.no_grad():
        z = b("image", torch.randn(2, 1, *cfg.loader.crop))
        t = b("text", b.text.tokenize(["Pleural effusion.", "No pleural effusion."]))
    assert z.shape == t.shape == (2, cfg.model.latent_dim) and torch.isfinite(z).all() and torch.isfinite(t).all()
    assert not torch.allclose(z[0], z[1]) and not torch.allclose(t[0], t[1])
    report = (out / "report.md").read_text()
    env = m["demo"]["environment"]
    assert f"with {' '.join(env['cpu_simd']) or 'no listed SIMD'}, torch {env['torch']}." in report
    assert "[2/6] verify: " in r.stdout and "report:" in r.stdout


def test_bench_loader_writes_result(tmp_path):
    r = run("bench", "loader", "--quiet", "bench.patients=3", "synth.shape=[16,40,40]", "synth.spacing=[18,9,9]",
            "loader.crop=[8,16,16]", "loader.num_workers=0", f"bench.results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    (res,) = tmp_path.glob("loader-cpu-*.json")
    rec = json.loads(res.read_text())
    for k in ("device", "date", "torch", "command", "throughput", "compression_ratio_synthetic"):
        assert k in rec
    assert {row["dataset"] for row in rec["throughput"]} == {"npy", "lz4", "one .npz per scan", "one .npy per scan"}
    assert {row["backend"] for row in rec["throughput"]} == {"torch (threads)", "torch (processes)", "dali",
                                                             "torch DataLoader (baseline)"}
    assert all(row["samples_per_s"] > 0 for row in rec["throughput"])
    ours = [row for row in rec["throughput"] if row["pass"] == "train transforms" and "baseline" not in row["backend"]]
    assert all(row["x_vs_per_file_npz"] > 0 and row["x_vs_per_file_npy"] > 0 for row in ours)
    assert rec["compression_ratio_synthetic"]["npy"] < 1.0 < rec["compression_ratio_synthetic"]["lz4"]
    assert "| dataset | backend | pass |" in r.stdout and "goal x_vs_per_file_npy >= 1.2" in r.stdout


@pytest.mark.slow
def test_bench_conv_tower_on_cpu_checks_agreement(tmp_path):
    """On CPU, `bench conv` runs the Triton kernels in the interpreter and records only whether
    they agree with torch (the GPU path times them): inference first, then training, the fused
    tower keeping fewer activations for its backward than torch's."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([CTVLP, "bench", "conv", "--quiet", "bench.conv_parts=[tower]", f"bench.results_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    (res,) = tmp_path.glob("conv-cpu-*.json")
    rows = {(row["tower"], row["impl"]): row for row in json.loads(res.read_text())["tower"]}
    assert list(rows) == [("inference", "cudnn eager"), ("inference", "triton fused"),
                          ("train fwd+bwd", "cudnn eager"), ("train fwd+bwd", "triton fused")]
    assert not any("error" in row for row in rows.values()), rows
    assert 0 <= rows[("inference", "triton fused")]["rel_err_inference"] < 1e-4
    train = rows[("train fwd+bwd", "triton fused")]
    assert 0 <= train["rel_err_y"] < 1e-4 and 0 <= train["rel_err_dx"] < 1e-4, train
    assert 0 < train["saved_MB_triton"] < 0.9 * train["saved_MB_torch"]  # the fused blocks keep fewer activations
    assert "| tower | impl |" in r.stdout
    bad = run("bench", "conv", "bench.conv_parts=[towr]")
    assert bad.returncode == 2 and "must be one of layers, blocks, tower" in bad.stderr


def test_records_written_in_one_second_are_all_kept(tmp_path):
    """Records are named by the second; a second record in the same second (a GPU script's quick
    steps) gets a suffix rather than overwriting the first."""
    from ctvlp_dist.records import write_result

    paths = [write_result(tmp_path, "loss", {"i": i}, argv=["x"]) for i in range(3)]
    assert len(set(paths)) == 3 and sorted(json.loads(p.read_text())["i"] for p in paths) == [0, 1, 2]


def test_records_name_the_cpu_simd_and_isa_caps(tmp_path):
    """fp32 CPU training is bit-reproducible only on the same vector extensions (the demo's 0.785
    vs 0.795, benchmarks/README.md), so a record lists the CPU's and any variable that caps them."""
    from ctvlp_dist.records import cpu_info

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 "
                   "avx512fx\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 amx_tile\n")
    assert cpu_info(x86) == ("AMD EPYC 9R14", ["avx2", "fma", "avx512f", "avx512_bf16"])  # the first block's flags
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd sve sve2 bf16\n")
    assert cpu_info(arm)[1] == ["asimd", "sve", "sve2"]
    assert cpu_info(tmp_path / "absent")[1] == []

    code = ("import sys; from ctvlp_dist.records import write_result; "
            "print(write_result(sys.argv[1], 'loss', {}, argv=['x']))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rec = json.loads(Path(r.stdout.strip()).read_text())
    assert rec["cpu_capability"] == "DEFAULT"  # ATen's dispatch level, as lowered
    assert rec["env"]["ATEN_CPU_CAPABILITY"] == "default" and rec["env"]["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"


def test_bench_loss_on_cpu_records_methods_and_inputs(tmp_path):
    """`ctvlp bench loss` on CPU: the torch methods (Triton methods need a GPU and are skipped),
    on the "mixed" inputs, whose pairs' cosines spread over [0, 0.9] at scale 100."""
    from ctvlp_dist.bench.loss import loss_inputs

    r = run("bench", "loss", "--quiet", "bench.loss_sizes=[300]", "bench.loss_methods=[dense,chunked,triton]",
            "bench.loss_inputs=mixed", f"bench.results_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    (res,) = tmp_path.glob("loss-cpu-*.json")
    rec = json.loads(res.read_text())
    assert rec["inputs"] == "mixed" and [row["method"] for row in rec["rows"]] == ["dense", "chunked"]
    assert all(row["status"] == "ok" and row["ms"] > 0 for row in rec["rows"])
    import torch

    I, T, s = loss_inputs(2000, 64, torch.float32, "cpu", kind="mixed")
    cos = (I * T).sum(1)
    assert float(s) == 100.0 and 0 <= float(cos.min()) < 0.05 and 0.85 < float(cos.max()) <= 0.9 + 1e-6
    with pytest.raises(ValueError, match="random or mixed"):
        loss_inputs(4, 4, torch.float32, "cpu", kind="trained")
