"""What the one-call GPU scripts (loss_gpu.py, conv_gpu.py) share: one wall-clock budget for the
whole device call (CTVLP_GPU_BUDGET_S, default 560 s, so a 10-minute call always returns its
files), steps run under it with their output logged to OUTDIR, and the device line."""
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_env() -> dict:
    """The kernels compile for the GPU: the interpreter must be off."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def print_device() -> None:
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv"], capture_output=True, text=True).stdout, flush=True)
    except FileNotFoundError:  # a CPU machine (--dry)
        print("no nvidia-smi: no GPU here", flush=True)


class Budget:
    def __init__(self, out: Path, env: dict):
        self.out, self.env = out, env
        self.deadline = time.time() + float(os.environ.get("CTVLP_GPU_BUDGET_S", 560))

    def sh(self, cmd, log, cap):
        """Run a step for at most `cap` seconds or what is left of the budget; its output goes to
        OUTDIR/log when `log` is set (the device tool returns a limited number of files)."""
        left = self.deadline - time.time()
        if left < 20:
            print(f"SKIPPED (budget spent): {' '.join(cmd)[:120]}", flush=True)
            return None
        print("$", " ".join(cmd)[:300], flush=True)
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=min(cap, left))
            text = r.stdout + "\n" + r.stderr
        except subprocess.TimeoutExpired as e:
            got = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text = f"TIMEOUT after {min(cap, left):.0f} s\n{got}"
            r = None
        if log:
            (self.out / log).write_text(text)
        print("\n".join(text.strip().splitlines()[-14:]), flush=True)
        return r
