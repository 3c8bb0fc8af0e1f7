"""`ctvlp launch slurm`: an sbatch script for any ctvlp job, its submission, and the job's status,
cancel and logs.

What the script does on the allocation (launch.engine):
  ray            ray start --head on the first node and ray start --address on the others (each with
                 its own address, ports of the job, and a restart loop: a lost node comes back), waits
                 for every node, then runs the ctvlp command on the head with RAY_ADDRESS set.
  ray-symmetric  the same through `ray symmetric-run` (Ray >= 2.49; one job per node only).
  torchrun       srun torchrun --nnodes N --rdzv-backend c10d ... -m ctvlp_dist.train.worker (train only).
Per job, not per node: Ray's ports and temp folder, and a token (mode 0600) that every node uses.
Signals: SLURM's early USR1 (--signal=B:USR1@grace) and a TERM to the batch shell reach the run,
which stops after an agreed step with a checkpoint; on USR1 the script requeues the job (launch.requeue),
and the requeued job resumes (train.resume=auto). Whatever ends the job, the cleanup ends every
process it started on every node (launcher/ray_node.sh reap).
"""
from __future__ import annotations

import datetime
import re
import shlex
import subprocess
import sys
from pathlib import Path

from ctvlp_dist import __version__

NODE_SCRIPT = Path(__file__).with_name("ray_node.sh")
# sbatch reads #SBATCH lines itself (not bash): their values must be single words.
SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_.:,@%+/=~\-\[\]&|*()!]+$")
DRIVER_MARK = {"ray": "bin/ctvlp", "ray-symmetric": "bin/ctvlp", "torchrun": "ctvlp_dist.train.worker"}
REFUSED = {"launch": "ctvlp launch runs here, not inside a job", "demo": "the demo runs on one machine: `make demo`"}


def q(value) -> str:
    """Every user value that enters the script's shell code goes through here."""
    return shlex.quote(str(value))


def _sbatch(key: str, value) -> str:
    value = str(value)
    if not SBATCH_VALUE.match(value):
        raise ValueError(f"{key}={value!r}: sbatch reads #SBATCH lines itself, so this value must be one "
                         "word without spaces, quotes or shell characters; choose another")
    return value


def workers_per_node(lc) -> int:
    return lc.workers_per_node or lc.gpus_per_node or 1


# commands whose processes serve metrics: on a cluster they bind where Prometheus can reach them
EXPORTING = ("train", "label", "synth", "shard")


def job_command(lc, argv: list[str]) -> list[str]:
    """The ctvlp command the job runs, with what the allocation decides appended (train: Ray Train
    over every node's workers). The in-process train.launcher stays the user's choice elsewhere."""
    if not argv:
        raise ValueError("give the ctvlp command to run, e.g. `ctvlp launch slurm train --config X.yaml`")
    if argv[0] in REFUSED:
        raise ValueError(f"ctvlp launch slurm {argv[0]}: {REFUSED[argv[0]]}")
    cmd = ["ctvlp", *argv]
    if argv[0] == "train":
        cmd += ["train.launcher=ray", f"train.workers={lc.nodes * workers_per_node(lc)}",
                f"train.use_gpu={'true' if lc.gpus_per_node else 'false'}", "train.resume=auto"]
    if argv[0] in EXPORTING:
        cmd.append(f"metrics.addr={lc.metrics_addr}")
    return cmd


def torchrun_command(lc, argv: list[str]) -> list[str]:
    if not argv or argv[0] != "train":
        raise ValueError("launch.engine=torchrun runs training only (`ctvlp launch slurm train ...`); "
                         "use launch.engine=ray for label, eval and bench")
    rest = [a for a in argv[1:] if a != "--quiet"]
    flags = [a for a in rest if a.startswith("-") and a != "--config"]
    if flags:
        raise ValueError(f"launch.engine=torchrun passes only --config and key=value overrides to "
                         f"ctvlp_dist.train.worker; write {flags[0]} as its train.* override")
    return ["-m", "ctvlp_dist.train.worker", *rest, f"train.use_gpu={'true' if lc.gpus_per_node else 'false'}",
            "train.resume=auto", f"metrics.addr={lc.metrics_addr}"]


def _header(lc, cwd: str) -> list[str]:
    opts = [("job-name", _sbatch("launch.job_name", lc.job_name)), ("nodes", int(lc.nodes)), ("ntasks-per-node", 1)]
    if lc.cpus_per_node:
        opts.append(("cpus-per-task", int(lc.cpus_per_node)))
    if lc.gpus_per_node:
        opts.append(("gpus-per-node", int(lc.gpus_per_node)))
    for key in ("mem", "time", "partition", "account", "qos", "constraint"):
        if getattr(lc, key):
            opts.append((key, _sbatch(f"launch.{key}", getattr(lc, key))))
    lines = [f"#SBATCH --{k}={v}" for k, v in opts]
    if lc.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [f"#SBATCH --chdir={_sbatch('the folder you submit from', cwd)}",
              f"#SBATCH --output={_sbatch('launch.output', str(Path(lc.output) / '%j.out'))}",
              "#SBATCH --open-mode=append",  # a requeued job's log follows the first run's
              f"#SBATCH --signal=B:USR1@{int(lc.signal_grace_s)}",
              "#SBATCH --requeue" if lc.requeue else "#SBATCH --no-requeue"]
    return lines


def _setup(lc, python: str) -> list[str]:
    if lc.setup:
        return ["# launch.setup, as given (shell lines of the user's own)", *lc.setup]
    venv = Path(python).parent
    if (venv / "activate").exists():
        return ["# launch.setup is empty: the virtual environment that rendered this script",
                f"source {q(venv / 'activate')}"]
    return [f"export PATH={q(str(venv))}:\"$PATH\"  # launch.setup is empty: the Python that rendered this script"]


def render(lc, argv: list[str], cwd: str | None = None, python: str = sys.executable) -> str:
    """The sbatch script of `ctvlp launch slurm ARGV...` for config section `lc` (LaunchConfig)."""
    cwd = str(Path(cwd or Path.cwd()).resolve())
    if lc.nodes < 1:
        raise ValueError(f"launch.nodes={lc.nodes}: give 1 or more")
    engine = lc.engine
    port = str(int(lc.ray_port)) if lc.ray_port else "$((20000 + SLURM_JOB_ID % 10 * 1000))"
    when = datetime.datetime.now().isoformat(timespec="seconds")
    relay = ('kill -s "$1" "$driver" 2>/dev/null' if engine == "ray" else
             f'on_nodes "${{node_sh[@]}}" signal "$1" {q(DRIVER_MARK[engine])}')
    s = ["#!/bin/bash",
         f"# Rendered by `ctvlp launch slurm` (ctvlp_dist {__version__}, {when}); engine {engine}.",
         "# Runs: ctvlp " + " ".join(q(a) for a in argv).replace("\n", "\\n"),  # a comment ends at a newline
         *_header(lc, cwd),
         "set -uo pipefail", "", *_setup(lc, python), "",
         "# The job's folder (on shared storage), its node script, its Ray token and its nodes.",
         f"job_dir={q(lc.output)}/\"$SLURM_JOB_ID\"",
         'mkdir -p "$job_dir" && rm -f "$job_dir/stop"',
         'echo "[ctvlp] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date -Is)"',
         "cat > \"$job_dir/ray_node.sh\" <<'CTVLP_NODE_SCRIPT'",
         NODE_SCRIPT.read_text().rstrip("\n"),
         "CTVLP_NODE_SCRIPT",
         'export CTVLP_JOB_DIR="$job_dir" CTVLP_JOB_KEY="ctvlp-$SLURM_JOB_ID"',
         f"export CTVLP_RAY_TMP={q(lc.ray_tmpdir)}/\"$SLURM_JOB_ID\"",
         f"export CTVLP_RAY_PORT={port}",
         f"export CTVLP_RAY_CPUS={q(lc.cpus_per_node or '')} CTVLP_RAY_GPUS={q(lc.gpus_per_node or '')}",
         "(umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > \"$job_dir/ray-token\")",
         'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$job_dir/ray-token"',
         'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
         'head=${nodes[0]}',
         'CTVLP_RAY_HEAD_IP=$(getent hosts "$head" | awk \'{print $1; exit}\')',
         'export CTVLP_RAY_HEAD_IP RAY_ADDRESS="$CTVLP_RAY_HEAD_IP:$CTVLP_RAY_PORT"',
         'node_sh=(bash "$job_dir/ray_node.sh")',
         'on_nodes() { srun --overlap --nodes="${#nodes[@]}" --ntasks-per-node=1 --kill-on-bad-exit=0 "$@"; }',
         "",
         "# Whatever ends the job: stop the node loops, end their steps, kill what is left of the job on every node.",
         "steps=()",
         "cleanup() {",
         '    [ -n "${cleaned:-}" ] && return; cleaned=1',
         '    touch "$job_dir/stop"',
         '    [ ${#steps[@]} -gt 0 ] && kill "${steps[@]}" 2>/dev/null',
         '    for _ in $(seq 30); do kill -0 "${steps[@]}" 2>/dev/null || break; sleep 1; done',
         '    on_nodes "${node_sh[@]}" reap',
         '    echo "[ctvlp] job $SLURM_JOB_ID: every process of the job ended on ${#nodes[@]} node(s)"',
         "}",
         "trap cleanup EXIT",
         "# SLURM's signals go to this shell (B:USR1 before the time limit; TERM from `ctvlp launch slurm cancel`).",
         'asked="" driver=""',
         f'relay() {{ asked=$1; echo "[ctvlp] SIG$1: asking the run to stop at the next step, with a checkpoint"; '
         f'[ -n "$driver" ] && {relay}; }}',
         "trap 'relay USR1' USR1",
         "trap 'relay TERM' TERM",
         'if ! on_nodes test -r "$job_dir/ray_node.sh"; then',
         f"    echo \"[ctvlp] error: $job_dir is not visible on every node: launch.output must be on storage that "
         "every node sees (and so must train.out)\" >&2",
         "    exit 1", "fi", ""]
    if engine == "ray":
        s += ["# Ray: the head here, one `ray start --address` per other node, restarted if it dies.",
              'srun --overlap --nodes=1 --ntasks=1 -w "$head" "${node_sh[@]}" head 0 & steps+=($!)',
              'for ((k = 1; k < ${#nodes[@]}; k++)); do',
              '    srun --overlap --nodes=1 --ntasks=1 -w "${nodes[k]}" "${node_sh[@]}" worker "$k" & steps+=($!)',
              "done",
              f'python -m launcher.nodes wait --nodes "${{#nodes[@]}}" --timeout {int(lc.node_wait_s)} '
              '--watch-pid "${steps[0]}" || exit 1',
              "cmd=(" + " ".join(q(a) for a in job_command(lc, argv)) + ")"]
    elif engine == "ray-symmetric":
        ray_args = [f"--num-cpus={int(lc.cpus_per_node)}"] if lc.cpus_per_node else []
        ray_args += [f"--num-gpus={int(lc.gpus_per_node)}"] if lc.gpus_per_node else []
        s += ["# Ray through `ray symmetric-run`: Ray on every node, the command on the head only.",
              'cmd=(srun --overlap --nodes="${#nodes[@]}" --ntasks-per-node=1 "${node_sh[@]}" run ray symmetric-run '
              f'--address "$RAY_ADDRESS" --min-nodes "${{#nodes[@]}}" --temp-dir "$CTVLP_RAY_TMP" '
              + " ".join(ray_args + ["--"] + [q(a) for a in job_command(lc, argv)]) + ")"]
    else:
        s += ["# torchrun: one agent per node, c10d rendezvous on the head.",
              'cmd=(srun --overlap --nodes="${#nodes[@]}" --ntasks-per-node=1 "${node_sh[@]}" run torchrun '
              f'--nnodes "${{#nodes[@]}}" --nproc-per-node {workers_per_node(lc)} --rdzv-backend c10d '
              f'--rdzv-endpoint "$CTVLP_RAY_HEAD_IP:{int(lc.rdzv_port)}" --rdzv-id "$SLURM_JOB_ID" '
              + " ".join(q(a) for a in torchrun_command(lc, argv)) + ")"]
    s += ["",
          "# The command; relay() passes SLURM's signals on: the run stops after an agreed step, with a checkpoint.",
          'if [ -n "$asked" ]; then echo "[ctvlp] stopped before the command started"; '
          '[ "$asked" = USR1 ] && rc=75 || rc=76; else',
          'echo "[ctvlp] running: ${cmd[*]}"',
          '"${cmd[@]}" &',
          "driver=$!",
          "while :; do wait \"$driver\"; rc=$?; kill -0 \"$driver\" 2>/dev/null || break; done",
          'if [ "$rc" -gt 128 ]; then wait "$driver"; rc=$?; fi',
          "fi",
          'echo "[ctvlp] the command ended with exit code $rc"',
          "cleanup"]
    if lc.requeue:
        s += ['if [ "$asked" = USR1 ] && [ "$rc" -ne 0 ]; then',
              '    echo "[ctvlp] requeueing job $SLURM_JOB_ID: it resumes from its checkpoint (train.resume=auto)"',
              '    scontrol requeue "$SLURM_JOB_ID"',
              "fi"]
    s += ['exit "$rc"', ""]
    return "\n".join(s)


# ---- the job, once submitted ------------------------------------------------------------------

def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise FileNotFoundError(f"{cmd[0]} not found: run this on a SLURM login node (or `make cluster-deps` "
                                "for a test cluster)") from None
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def submit(script: str, output: str) -> str:
    """Write the script beside the job logs and sbatch it; the job id."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)  # sbatch opens <output>/<job id>.out before the script runs
    path = out / f"sbatch-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S%f')}.sh"
    path.write_text(script)
    job = _run("sbatch", "--parsable", str(path)).stdout.strip().split(";")[0]
    path.rename(out / f"{job}.sbatch.sh")
    return job


def job_info(job: str) -> dict:
    """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, StdOut, NodeList, ...)."""
    text = _run("scontrol", "show", "job", "-o", str(job)).stdout.strip()
    info = {}
    for tok in re.split(r" (?=[A-Za-z:/]+=)", text):
        k, _, v = tok.partition("=")
        info[k] = v
    return info


def cancel(job: str, now: bool = False) -> str:
    """TERM to the batch shell only: the run stops after an agreed step with a checkpoint, and the
    script ends the job's processes (a bare `scancel` TERMs every process of the job at once, Ray's
    included, so nothing is left to checkpoint with). now=True: a bare scancel."""
    if now:
        _run("scancel", str(job))
        return f"job {job}: cancelled now (no checkpoint beyond the last periodic one)"
    _run("scancel", "--batch", "--signal=TERM", str(job))
    return f"job {job}: asked to stop at the next step with a checkpoint; it is not requeued"
