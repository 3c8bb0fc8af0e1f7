"""`ctvlp launch ...`: the cluster side of a run.

  ctvlp launch slurm [--dry-run] <command> [its args and overrides]   render and submit an sbatch script
  ctvlp launch slurm status|cancel|logs JOBID
  ctvlp launch ray-local --nodes N [-- command ...]                    N Ray nodes on this host, same node script
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import slurm

JOB_ACTIONS = ("status", "cancel", "logs")


def _slurm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctvlp launch slurm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render an sbatch script for a ctvlp job from its config's `launch:` section (and launch.* "
                    "overrides), and submit it; or act on a submitted job.",
        epilog="examples:\n"
               "  ctvlp launch slurm --dry-run train --config configs/train_clip_seed.yaml launch.nodes=4 "
               "launch.gpus_per_node=8\n"
               "  ctvlp launch slurm train --config configs/train_clip_seed.yaml launch.nodes=4 launch.gpus_per_node=8 "
               "launch.time=24:00:00\n"
               "  ctvlp launch slurm status 1234\n"
               "  ctvlp launch slurm cancel 1234        # stop at the next step with a checkpoint, no requeue\n"
               "  ctvlp launch slurm logs 1234")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("--now", action="store_true", help="cancel: a bare scancel (no checkpoint)")
    p.add_argument("command", help="a ctvlp command (train, label, eval, bench, ...) or status|cancel|logs")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own args and overrides, or JOBID")
    return p


def cmd_slurm(argv: list[str]) -> int:
    args = _slurm_parser().parse_args(argv)
    if args.command in JOB_ACTIONS:
        if len(args.args) != 1:
            print(f"ctvlp launch slurm {args.command}: give one JOBID", file=sys.stderr)
            return 2
        return _job_action(args.command, args.args[0], args.now)
    from ctvlp_dist.cli import resolve_config

    job_argv = [args.command, *args.args]
    lc = resolve_config(job_argv).launch
    script = slurm.render(lc, job_argv)
    if args.dry_run:
        print(script, end="")
        return 0
    job = slurm.submit(script, lc.output)
    print(f"submitted job {job}: log {Path(lc.output) / (job + '.out')}; "
          f"`ctvlp launch slurm status {job}`, `... logs {job}`, `... cancel {job}`")
    print(job)
    return 0


def _job_action(action: str, job: str, now: bool) -> int:
    if action == "cancel":
        print(slurm.cancel(job, now))
        return 0
    info = slurm.job_info(job)
    if action == "status":
        keys = ("JobId", "JobName", "JobState", "Reason", "RunTime", "TimeLimit", "NodeList", "Restarts", "ExitCode",
                "StdOut")
        for k in keys:
            print(f"{k:>10}: {info.get(k, '')}")
        return 0
    log = Path(info.get("StdOut", ""))
    if not log.is_file():
        print(f"job {job}: no log yet at {log} (state {info.get('JobState')})", file=sys.stderr)
        return 1
    sys.stdout.write(log.read_text(errors="replace"))
    nodes = sorted(log.with_suffix("").glob("ray-node-*.log")) if log.suffix == ".out" else []
    if nodes:
        print(f"\n[ctvlp] each node's `ray start` log: {', '.join(str(n) for n in nodes)}")
    return 0


# ---- ray-local --------------------------------------------------------------------------------

def cmd_ray_local(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ctvlp launch ray-local", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a Ray cluster of N nodes on this host with the node script the SLURM jobs use "
                    "(launcher/ray_node.sh: its own ports, temp folder and token), to try the multi-node path. "
                    "With a command after --, run it against the cluster (RAY_ADDRESS set) and stop the cluster; "
                    "without, print the environment to join it and wait for Ctrl-C.",
        epilog="example: ctvlp launch ray-local --nodes 2 -- ctvlp train --config configs/train_tiny_cpu.yaml "
               "train.data=runs/synth train.workers=2")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--cpus-per-node", type=int, default=0, help="each node's Ray CPUs (0: Ray's detection)")
    p.add_argument("--port", type=int, default=0, help="first of the cluster's 1000 ports (0: from this process id)")
    p.add_argument("--out", default="runs/ray-local", help="folder for the token and the nodes' logs")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every node")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    key = f"ctvlp-local-{os.getpid()}"
    job_dir = Path(args.out).resolve() / key
    job_dir.mkdir(parents=True, exist_ok=True)
    token = job_dir / "ray-token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32) + "\n")
    port = args.port or 20000 + os.getpid() % 10 * 1000
    env = {**os.environ, "CTVLP_JOB_DIR": str(job_dir), "CTVLP_JOB_KEY": key, "CTVLP_NODE_IP": "127.0.0.1",
           "CTVLP_RAY_TMP": f"/tmp/ctvlp-ray/{key}", "CTVLP_RAY_PORT": str(port), "CTVLP_RAY_HEAD_IP": "127.0.0.1",
           "CTVLP_RAY_CPUS": str(args.cpus_per_node or ""), "CTVLP_RAY_GPUS": "",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ADDRESS": f"127.0.0.1:{port}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # this venv's `ray`
    node_sh = ["bash", str(slurm.NODE_SCRIPT)]
    nodes = [subprocess.Popen([*node_sh, "head" if i == 0 else "worker", str(i)], env=env) for i in range(args.nodes)]
    rc = 1
    try:
        if subprocess.run([sys.executable, "-m", "launcher.nodes", "wait", "--nodes", str(args.nodes),
                           "--timeout", str(args.timeout), "--watch-pid", str(nodes[0].pid)], env=env).returncode != 0:
            return 1
        if command:
            rc = subprocess.run(command, env=env).returncode
        else:
            print(f"export RAY_ADDRESS=127.0.0.1:{port} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token}\n"
                  "[ctvlp] the cluster runs until Ctrl-C", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        rc = 0 if not command else 130
    finally:
        (job_dir / "stop").touch()
        for n in nodes:
            n.terminate()
        deadline = time.time() + 30
        for n in nodes:
            try:
                n.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                n.kill()
        subprocess.run([*node_sh, "reap"], env=env)
        print(f"[ctvlp] ray-local: {args.nodes} nodes stopped", file=sys.stderr)
    return rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    where, rest = argv[0], argv[1:]
    if where == "slurm":
        return cmd_slurm(rest)
    if where == "ray-local":
        return cmd_ray_local(rest)
    print(f"ctvlp launch: unknown target {where!r} (slurm, ray-local)", file=sys.stderr)
    return 2
