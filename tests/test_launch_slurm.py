"""`ctvlp launch slurm` on a real SLURM cluster: two logical nodes on this host (slurm_cluster.py),
real sbatch, srun, scancel and scontrol requeue, a real two-node Ray cluster started by the job's
script, and Ray Train + DeepSpeed running one worker on each node over gloo.

What one host cannot show (see the README's "Running on a cluster"): storage that one node does
not see (the check's failure is tested in test_train_parts-style with two ranks instead), GPUs,
and a network between real machines.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import ROOT
from .slurm_cluster import SlurmCluster, missing

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]
STEPS = 6
JOBS_AT_ONCE = 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(f"no SLURM cluster here: {why}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    c.jobs = []
    os.environ["SLURM_CONF"] = str(c.conf)  # for launcher.slurm's scontrol / scancel calls in this process
    yield c
    os.environ.pop("SLURM_CONF", None)
    for job in c.jobs:  # a failed test may leave its job running
        c.run("scancel", job, check=False)
    time.sleep(3)
    for job in c.jobs:
        for pid in job_processes(job):
            os.kill(pid, signal.SIGKILL)
    c.stop()


def submit(cluster, config: str, run: Path, args: list[str], *extra: str) -> str:
    p = subprocess.run([str(Path(sys.executable).parent / "ctvlp"), "launch", "slurm", "train", "--config", config,
                        f"train.out={run}", *args, *extra], capture_output=True, text=True, cwd=ROOT,
                       env=cluster.env, timeout=120)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().splitlines()[-1]
    cluster.jobs.append(job)
    return job


def info(cluster, job: str) -> dict:
    from launcher.slurm import job_info

    return job_info(job)


def wait_until(pred, timeout: float, what: str, cluster=None, job=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    log = job_log(cluster, job)[-4000:] if job else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")


def job_log(cluster, job: str) -> str:
    p = Path(info(cluster, job).get("StdOut", ""))
    return p.read_text(errors="replace") if p.is_file() else ""


def ended(cluster, job: str) -> dict | None:
    i = info(cluster, job)
    return i if i["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def job_processes(job: str) -> list[int]:
    """This job's processes on the host (both logical nodes): they carry its tag (ray_node.sh)."""
    tag = f"CTVLP_JOB_TAG=ctvlp-{job}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if tag in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def assert_nothing_left(job: str) -> None:
    assert job_processes(job) == [], f"job {job} left processes behind"
    assert not Path(f"/tmp/ctvlp-ray/{job}").exists(), "the job's Ray temp folder is still there"


def reference(cluster, out: Path, args: list[str], cfg_root: Path) -> dict:
    """An uninterrupted two-node run, submitted with a config path and a value that no shell may
    touch: they must reach the job unchanged. While it runs: is a client without its token refused?"""
    weird = cfg_root / "it's a \"dir\" $(touch pwned) `touch pwned2`"
    weird.mkdir()
    for name in ("train_tiny_cpu.yaml", "model_r3d18_lite.yaml"):
        shutil.copy(ROOT / "configs" / name, weird / name)
    value = "x y 'q' \"dq\" $(touch pwned3) `touch pwned4` \\ *"
    run = out / "reference"
    job = submit(cluster, str(weird / "train_tiny_cpu.yaml"), run, args, f"eval.out={value}")
    wait_until(lambda: rows(run), 300, "the first step", cluster, job)
    token = out / "slurm" / job / "ray-token"
    port = 20000 + int(job) % 10 * 1000
    probe = ("import ray, sys\nray.init(address=sys.argv[1], log_to_driver=False)\n"
             "print(len([n for n in ray.nodes() if n['Alive']]))")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    home = out / "home-without-token"
    home.mkdir()
    driver = _driver(job)
    os.kill(driver, signal.SIGSTOP)  # hold the job (its cluster lives while the driver does) for the probes
    try:
        no_token = subprocess.run([sys.executable, "-c", probe, f"127.0.1.11:{port}"], capture_output=True,
                                  text=True, timeout=120, env={**base, "HOME": str(home)})
        with_token = subprocess.run([sys.executable, "-c", probe, f"127.0.1.11:{port}"], capture_output=True,
                                    text=True, timeout=120, env={**base, "HOME": str(home), "RAY_AUTH_MODE": "token",
                                                                 "RAY_AUTH_TOKEN_PATH": str(token)})
    finally:
        os.kill(driver, signal.SIGCONT)
    mode = token.stat().st_mode & 0o777
    end = wait_until(lambda: ended(cluster, job), 900, "the job's end", cluster, job)
    return dict(job=job, run=run, info=end, no_token=no_token, with_token=with_token, token_mode=mode, value=value,
                weird=weird, log=job_log(cluster, job))


def requeue(cluster, out: Path, args: list[str]) -> dict:
    run = out / "requeue"
    job = submit(cluster, str(ROOT / "configs" / "train_tiny_cpu.yaml"), run, args)
    wait_until(lambda: rows(run), 300, "the first step", cluster, job)
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@grace sends
    wait_until(lambda: info(cluster, job)["Restarts"] == "1", 300, "the requeue", cluster, job)
    # SLURM holds a requeued job for about two minutes; an operator may release it at once
    wait_until(lambda: cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False).returncode == 0,
               60, "the release")
    end = wait_until(lambda: ended(cluster, job), 900, "the requeued job's end", cluster, job)
    return dict(job=job, run=run, info=end, log=job_log(cluster, job))


def cancel(cluster, out: Path, args: list[str]) -> dict:
    run = out / "cancel"
    job = submit(cluster, str(ROOT / "configs" / "train_tiny_cpu.yaml"), run, args)
    wait_until(lambda: rows(run), 300, "the first step", cluster, job)
    p = subprocess.run([str(Path(sys.executable).parent / "ctvlp"), "launch", "slurm", "cancel", job],
                       capture_output=True, text=True, env=cluster.env, timeout=60)
    end = wait_until(lambda: ended(cluster, job), 600, "the job's end", cluster, job)
    time.sleep(2)
    ctvlp = [str(Path(sys.executable).parent / "ctvlp"), "launch", "slurm"]
    status, logs = (subprocess.run([*ctvlp, what, job], capture_output=True, text=True, env=cluster.env, timeout=60)
                    for what in ("status", "logs"))
    return dict(job=job, run=run, info=end, cancel=p, later=info(cluster, job), log=job_log(cluster, job),
                status=status, logs=logs)


def node_failure(cluster, out: Path, args: list[str]) -> dict:
    run = out / "node-failure"
    job = submit(cluster, str(ROOT / "configs" / "train_tiny_cpu.yaml"), run, args, "train.max_failures=3")
    wait_until(lambda: len(rows(run)) >= 3, 600, "step 3", cluster, job)  # past the step-2 checkpoint
    raylets = [pid for pid in job_processes(job) if _cmdline(pid)[:1] and b"raylet" in _cmdline(pid)[0]
               and any(f"/{job}/1/".encode() in a for a in _cmdline(pid))]  # node 1's (ctvlpn2), not the head's
    for pid in raylets:
        os.kill(pid, signal.SIGKILL)
    end = wait_until(lambda: ended(cluster, job), 900, "the job's end", cluster, job)
    return dict(job=job, run=run, info=end, killed=raylets, log=job_log(cluster, job))


def _driver(job: str) -> int:
    """The job's `ctvlp train` driver process (in the batch step, on the head node)."""
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and f"SLURM_JOB_ID={job}".encode() in (p / "environ").read_bytes().split(b"\0"):
                argv = _cmdline(int(p.name))
                if any(a.endswith(b"bin/ctvlp") for a in argv[:2]) and b"train" in argv:
                    return int(p.name)
        except OSError:
            pass
    raise AssertionError(f"no driver process for job {job}")


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


@pytest.fixture(scope="module")
def jobs(cluster, train_cohort, tmp_path_factory) -> dict:
    """The four jobs, each driven by its own thread (signals land mid-run, whatever the order the
    tests read the results in), JOBS_AT_ONCE at a time: each worker holds ~3.5 GB, and the rest of
    the suite runs beside. The image tower is narrow (width 16): ZeRO's gradient traffic over gloo,
    not the launcher, would otherwise take most of each step."""
    data, labels = train_cohort
    out = tmp_path_factory.mktemp("slurm-runs")
    args = [f"train.data={data}", f"loader.labels={labels}", "train.stage=supervised", f"train.steps={STEPS}",
            "train.ckpt_every=2", "train.zero_stage=2", "model.width=16", "launch.nodes=2", "launch.cpus_per_node=1",
            f"launch.output={out / 'slurm'}", "--quiet"]
    pool = ThreadPoolExecutor(JOBS_AT_ONCE)
    futures = {"reference": pool.submit(reference, cluster, out, args, tmp_path_factory.mktemp("cfg")),
               "requeue": pool.submit(requeue, cluster, out, args),
               "cancel": pool.submit(cancel, cluster, out, args),
               "node_failure": pool.submit(node_failure, cluster, out, args)}
    yield futures
    pool.shutdown(wait=True)


def test_train_runs_across_both_nodes(jobs):
    r = jobs["reference"].result()
    assert r["info"]["JobState"] == "COMPLETED" and r["info"]["ExitCode"] == "0:0", r["log"][-4000:]
    summary = json.loads((r["run"] / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["workers"] == 2 and summary["nodes"] == 2, summary
    assert (r["run"] / "model.safetensors").exists() and summary["export"]
    assert [x["step"] for x in rows(r["run"])] == list(range(1, STEPS + 1))
    assert "2 Ray nodes up: ['127.0.1.11', '127.0.1.12']" in r["log"]
    # the hostile config path and value reached the job unchanged, and no shell ran them
    ckpt = sorted(p for p in (r["run"] / "ray" / "run").glob("checkpoint_*") if p.is_dir())[-1]
    assert json.loads((ckpt / "config.json").read_text())["eval"]["out"] == r["value"]
    assert not any((d / n).exists() for d in (ROOT, r["weird"].parent) for n in ("pwned", "pwned2", "pwned3", "pwned4"))
    assert_nothing_left(r["job"])


def test_a_client_without_the_job_s_token_is_refused(jobs):
    r = jobs["reference"].result()
    assert r["token_mode"] == 0o600
    assert r["with_token"].returncode == 0 and r["with_token"].stdout.split()[-1] == "2", r["with_token"].stderr[-2000:]
    assert r["no_token"].returncode != 0
    assert "token" in r["no_token"].stderr.lower() or "authentication" in r["no_token"].stderr.lower(), \
        r["no_token"].stderr[-2000:]


def test_usr1_checkpoints_requeues_and_resumes_exactly(jobs):
    r, ref = jobs["requeue"].result(), jobs["reference"].result()
    end, log, run = r["info"], r["log"], r["run"]
    assert end["JobState"] == "COMPLETED" and end["ExitCode"] == "0:0", log[-4000:]
    assert "stopped on request (requeue)" in log and f"requeueing job {r['job']}" in log and "(restart 1)" in log
    got, want = rows(run), {x["step"]: x["loss"] for x in rows(ref["run"])}
    assert [x["step"] for x in got] == list(range(1, STEPS + 1))  # each step once: the stop fell on a boundary
    assert all(x["loss"] == want[x["step"]] for x in got), (got, want)  # bit for bit
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"] and summary["stopped"] is None
    assert_nothing_left(r["job"])


def test_cancel_checkpoints_and_ends_without_requeue(jobs):
    r = jobs["cancel"].result()
    end, log, run = r["info"], r["log"], r["run"]
    assert r["cancel"].returncode == 0 and "not requeued" in r["cancel"].stdout, r["cancel"].stderr
    assert end["ExitCode"] == "76:0" and end["Restarts"] == "0", log[-4000:]
    assert "stopped on request (cancelled)" in log and "requeueing" not in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == "cancelled" and summary["steps"] < STEPS and summary["export"] is None
    assert r["later"]["JobState"] == end["JobState"] and r["later"]["Restarts"] == "0"  # not requeued
    assert r["status"].returncode == 0 and f"JobState: {end['JobState']}" in r["status"].stdout
    assert "ExitCode: 76:0" in r["status"].stdout and "Restarts: 0" in r["status"].stdout
    assert r["logs"].returncode == 0 and r["logs"].stdout.startswith(log) and "ray-node-1.log" in r["logs"].stdout
    assert_nothing_left(r["job"])


def test_a_lost_node_comes_back_and_the_run_goes_on(jobs):
    r, ref = jobs["node_failure"].result(), jobs["reference"].result()
    end, log, run = r["info"], r["log"], r["run"]
    assert len(r["killed"]) == 1, r["killed"]  # node 1's raylet
    assert end["JobState"] == "COMPLETED" and end["ExitCode"] == "0:0", log[-4000:]
    assert "node 1's Ray exited" in log and "restarting it" in log
    got, want = rows(run), {x["step"]: x["loss"] for x in rows(ref["run"])}
    assert all(x["loss"] == want[x["step"]] for x in got), (got, want)  # the redone steps too: same samples
    last = {}
    for x in got:
        last[x["step"]] = x
    assert sorted(last) == list(range(1, STEPS + 1))
    steps = [x["step"] for x in got]
    assert len(steps) > STEPS and steps[:3] == [1, 2, 3]  # some steps ran twice: after the restart
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"] and summary["nodes"] == 2
    assert_nothing_left(r["job"])


def test_ray_local_runs_a_command_on_n_nodes_and_leaves_nothing(tmp_path):
    """`ctvlp launch ray-local`: the SLURM jobs' node script, N times on this host (no SLURM)."""
    probe = "import ray; ray.init(log_to_driver=False); print('alive nodes:', len([n for n in ray.nodes() if n['Alive']]))"
    p = subprocess.run([str(Path(sys.executable).parent / "ctvlp"), "launch", "ray-local", "--nodes", "2",
                        "--cpus-per-node", "1", "--port", "30000", "--out", str(tmp_path), "--", sys.executable, "-c",
                        probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "alive nodes: 2" in p.stdout and "2 Ray nodes up" in p.stdout
    (job_dir,) = tmp_path.glob("ctvlp-local-*")
    assert (job_dir / "ray-token").stat().st_mode & 0o777 == 0o600
    assert job_processes(job_dir.name.removeprefix("ctvlp-")) == []
    assert not Path("/tmp/ctvlp-ray", job_dir.name).exists()
