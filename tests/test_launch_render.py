"""The sbatch script of `ctvlp launch slurm`, rendered only: bash accepts it, user values reach the
command unchanged however hostile, #SBATCH values that sbatch would misread are refused, and the
ray-symmetric and torchrun engines render what Ray's and torchtitan's SLURM recipes run. (Running
it on a real SLURM cluster: test_launch_slurm.py.)"""
import dataclasses
import subprocess
import sys

import pytest

from ctvlp_dist.config import load_config

from .conftest import ROOT, run_ctvlp

HOSTILE = ["a b", "it's", 'say "hi"', "$(touch pwned)", "`touch pwned`", "line1\nline2", "back\\slash", "*", "~", "-x"]


def _launch(**kw):
    return dataclasses.replace(load_config(None).launch, **kw)


def _render(lc, argv, tmp_path):
    from launcher.slurm import render

    return render(lc, argv, cwd=str(tmp_path))


def _bash_n(script: str) -> None:
    p = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def _cmd_array(script: str, tmp_path) -> list[str]:
    """Evaluate the script's `cmd=(...)` line in bash (no SLURM needed) and read the words back."""
    line = script[script.index("\ncmd=(") + 1:script.index("\n\n# The command")]  # a value may hold newlines
    probe = tmp_path / "probe.sh"
    probe.write_text(f'RAY_ADDRESS=h:1 CTVLP_RAY_TMP=/t CTVLP_RAY_HEAD_IP=h SLURM_JOB_ID=7\nnodes=(a b)\n'
                     f'node_sh=(bash n.sh)\n{line}\nprintf "%s\\0" "${{cmd[@]}}"\n')
    p = subprocess.run(["bash", str(probe)], capture_output=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    return p.stdout.decode().split("\0")[:-1]


def test_hostile_values_reach_the_command_unchanged(tmp_path):
    argv = ["train", "--config", "/data/my configs/it's.yaml", *[f"eval.out={v}" for v in HOSTILE]]
    lc = _launch(nodes=3, setup=("module load cuda/12.4", "source '/opt/venv x/bin/activate'"),
                 output="/shared/runs/slurm", ray_tmpdir="/tmp/ray tmp $(x)")
    script = _render(lc, argv, tmp_path)
    _bash_n(script)
    words = _cmd_array(script, tmp_path)
    assert words[:len(argv) + 1] == ["ctvlp", *argv]
    assert words[len(argv) + 1:] == ["train.launcher=ray", "train.workers=3", "train.use_gpu=false", "train.resume=auto",
                                     "metrics.addr=node"]  # each rank's exporter binds its node's address
    assert not (tmp_path / "pwned").exists()
    assert "export CTVLP_RAY_TMP='/tmp/ray tmp $(x)'/\"$SLURM_JOB_ID\"" in script
    assert "module load cuda/12.4\nsource '/opt/venv x/bin/activate'" in script  # setup lines are the user's shell


def test_the_header_asks_slurm_for_the_allocation_and_the_early_signal(tmp_path):
    lc = _launch(nodes=4, gpus_per_node=8, cpus_per_node=64, mem="900G", time="24:00:00", partition="gpu",
                 account="rad-lab", qos="high", constraint="h100&ib", exclusive=True, signal_grace_s=600,
                 output="runs/slurm")
    script = _render(lc, ["train", "--config", "configs/train_clip_seed.yaml"], tmp_path)
    _bash_n(script)
    head = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert head == ["#SBATCH --job-name=ctvlp", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                    "#SBATCH --cpus-per-task=64", "#SBATCH --gpus-per-node=8", "#SBATCH --mem=900G",
                    "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=rad-lab",
                    "#SBATCH --qos=high", "#SBATCH --constraint=h100&ib", "#SBATCH --exclusive",
                    f"#SBATCH --chdir={tmp_path.resolve()}", "#SBATCH --output=runs/slurm/%j.out",
                    "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue"]
    words = _cmd_array(script, tmp_path)
    assert "train.workers=32" in words and "train.use_gpu=true" in words
    assert "export CTVLP_RAY_CPUS=64 CTVLP_RAY_GPUS=8" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "#SBATCH --no-requeue" in _render(dataclasses.replace(lc, requeue=False), ["eval"], tmp_path)
    assert "scontrol requeue" not in _render(dataclasses.replace(lc, requeue=False), ["eval"], tmp_path)


@pytest.mark.parametrize("key,value", [("partition", "gpu a"), ("account", "x'y"), ("time", "1:00\n#SBATCH --x"),
                                       ("job_name", "$(id)"), ("output", "my runs")])
def test_values_sbatch_would_misread_are_refused(key, value, tmp_path):
    with pytest.raises(ValueError, match=f"launch.{key}=.*one word"):
        _render(_launch(**{key: value}), ["eval"], tmp_path)


def test_symmetric_run_renders_ray_s_recipe(tmp_path):
    lc = _launch(nodes=2, engine="ray-symmetric", cpus_per_node=8, gpus_per_node=4)
    script = _render(lc, ["label", "--config", "c.yaml"], tmp_path)
    _bash_n(script)
    words = _cmd_array(script, tmp_path)
    sep = words.index("--")
    assert words[:sep] == ["srun", "--overlap", "--nodes=2", "--ntasks-per-node=1", "bash", "n.sh", "run", "ray",
                           "symmetric-run", "--address", "h:1", "--min-nodes", "2", "--temp-dir", "/t",
                           "--num-cpus=8", "--num-gpus=4"]
    assert words[sep + 1:] == ["ctvlp", "label", "--config", "c.yaml", "metrics.addr=node"]
    assert "ray start" not in script.split("CTVLP_NODE_SCRIPT")[-1]  # symmetric-run starts Ray itself


def test_torchrun_renders_torchtitan_s_recipe(tmp_path):
    lc = _launch(nodes=2, engine="torchrun", gpus_per_node=8, rdzv_port=29400)
    script = _render(lc, ["train", "--config", "c.yaml", "train.steps=9", "--quiet"], tmp_path)
    _bash_n(script)
    assert _cmd_array(script, tmp_path) == [
        "srun", "--overlap", "--nodes=2", "--ntasks-per-node=1", "bash", "n.sh", "run", "torchrun", "--nnodes", "2",
        "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:29400", "--rdzv-id", "7",
        "-m", "ctvlp_dist.train.worker", "--config", "c.yaml", "train.steps=9", "train.use_gpu=true",
        "train.resume=auto", "metrics.addr=node"]
    assert "signal \"$1\" ctvlp_dist.train.worker" in script  # signals reach every rank on every node
    with pytest.raises(ValueError, match="training only"):
        _render(lc, ["eval"], tmp_path)
    with pytest.raises(ValueError, match="--steps"):
        _render(lc, ["train", "--steps", "3"], tmp_path)


def test_dry_run_prints_the_script_of_the_config_s_launch_section(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("launch:\n  nodes: 3\n  partition: debug\n")
    p = run_ctvlp("launch", "slurm", "--dry-run", "eval", "--config", str(cfg), "launch.time=01:00:00")
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --nodes=3" in p.stdout and "#SBATCH --partition=debug" in p.stdout
    assert "#SBATCH --time=01:00:00" in p.stdout
    _bash_n(p.stdout)
    ctvlp = [sys.executable, "-m", "ctvlp_dist", "launch", "slurm"]
    bad = subprocess.run([*ctvlp, "--dry-run", "demo"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "make demo" in bad.stderr
    assert subprocess.run([*ctvlp, "status"], capture_output=True, cwd=ROOT).returncode == 2


def test_node_script_is_the_one_shipped(tmp_path):
    from launcher.slurm import NODE_SCRIPT

    script = _render(_launch(), ["eval"], tmp_path)
    body = script.split("<<'CTVLP_NODE_SCRIPT'\n")[1].split("\nCTVLP_NODE_SCRIPT\n")[0]
    assert body == NODE_SCRIPT.read_text().rstrip("\n")
    _bash_n(NODE_SCRIPT.read_text())
    assert (ROOT / "launcher" / "ray_node.sh").exists()


def test_label_engines_fill_the_allocation_one_per_tp_gpus_of_each_node():
    """label.engines=0 under a multi-node job: an engine never spans nodes, so leftover GPUs of a
    node stay idle; a dead node counts for nothing. (Ray's node records, as ray.nodes() gives them.)"""
    from ctvlp_dist.labels.pool import engine_count

    nodes = [{"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}}, {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 6.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert engine_count(nodes, 1, 2, gpu=True) == 14
    assert engine_count(nodes, 4, 2, gpu=True) == 2 + 1
    assert engine_count(nodes, 8, 2, gpu=True) == 1
    assert engine_count(nodes, 1, 16, gpu=False) == 8
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        engine_count(nodes, 16, 2, gpu=True)
