"""`ctvlp <command>`: every command reads the same typed config (YAML + key=value overrides)."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Callable

import yaml

from .config import ConfigError, config_to_dict, load_config, valid_keys

OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
EPILOG = ("Every command also takes --config FILE.yaml and trailing section.key=value overrides, "
          "e.g. `ctvlp synth --out d loader.batch_size=4`. `ctvlp config keys` lists all keys.")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/); flags and overrides win over it")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _flag(p, name, key, **kw):
    """A convenience flag that is just an override of config key `key`."""
    p.add_argument(name, dest=key.replace(".", "__"), default=None, **kw)


def _cfg(args):
    over = list(args.overrides or [])
    for k, v in vars(args).items():
        if "__" in k and v is not None:
            over.append(f"{k.replace('__', '.')}={v}")
    return load_config(args.config, over)


def _final_line(summary: dict) -> str:
    return (f"cases in: {summary['cases_in']} = samples written: {summary.get('samples_written', summary.get('files_written'))}"
            f" + rejected: {summary['rejected']}")


def cmd_synth(args) -> int:
    from data_shards.synth.cohort import run_synth

    cfg = _cfg(args)
    s = run_synth(cfg, progress=not args.quiet)
    print(json.dumps(s))
    print(_final_line(s))
    return 0


def cmd_shard(args) -> int:
    from data_shards.ingest.pipeline import run_ingest

    cfg = _cfg(args)
    for k in ("images", "reports", "out"):
        if not getattr(cfg.ingest, k):
            raise ConfigError(f"ctvlp shard needs --{k} (or ingest.{k}=...)")
    s = run_ingest(cfg, progress=not args.quiet)
    print(json.dumps(s))
    if s["rejected"]:
        print(f"rejects and reasons: {s['out']}/ingest_report.json")
    print(_final_line(s))
    return 0


def cmd_verify(args) -> int:
    from tqdm import tqdm

    from data_shards.verify import verify_dataset

    prog = None if args.quiet else (lambda it: tqdm(it, desc="verify", unit="shard"))
    res = verify_dataset(args.dir, decode=not args.no_decode, progress=prog)
    print(res.summary())
    return 0 if res.ok else 1


def cmd_bench(args) -> int:
    from .bench import loader as bench_loader

    cfg = _cfg(args)
    if args.what == "loader":
        bench_loader.run(cfg, progress=not args.quiet, argv=sys.argv)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(_cfg(args), progress=not args.quiet)


def cmd_config(args) -> int:
    cfg = _cfg(args)
    if args.action == "keys":
        print("\n".join(valid_keys()))
    else:
        print(yaml.safe_dump(json.loads(json.dumps(config_to_dict(cfg))), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ctvlp", description="Train CT vision-language models at scale: "
                                 "shards -> loader -> model -> loss -> engine -> metrics.", epilog=EPILOG)
    sub = ap.add_subparsers(dest="command", metavar="<command>")
    cmds: dict[str, Callable] = {}

    p = sub.add_parser("synth", help="generate the synthetic chest-CT cohort (straight to shards, or raw NIfTI)",
                       description="Deterministic chest-CT phantoms with the 18 CT-RATE findings rendered visibly, "
                                   "anatomy masks and CT-RATE-style reports; ground truth in ground_truth.csv.",
                       epilog=EPILOG)
    _flag(p, "--patients", "synth.patients", type=int, help="number of patients")
    _flag(p, "--out", "synth.out", help="output folder")
    _flag(p, "--seed", "synth.seed", type=int, help="random seed (same seed, same cohort)")
    _flag(p, "--codec", "shard.codec", choices=["npy", "lz4"], help="volume codec")
    _flag(p, "--workers", "synth.workers", type=int, help="parallel processes")
    _flag(p, "--raw", "synth.raw", choices=["true", "false"], help="write NIfTI + CSVs at real CT-RATE spacings")
    _add_common(p)
    cmds["synth"] = cmd_synth

    p = sub.add_parser("shard", help="ingest NIfTI/DICOM CTs + a report CSV into WebDataset shards",
                       description="Reorient to RAS, rescale to HU exactly once, resample, crop/pad, and stream into "
                                   "shards. Bad cases are rejected with a reason in ingest_report.json.",
                       epilog=EPILOG)
    _flag(p, "--images", "ingest.images", help="folder of .nii/.nii.gz files and/or DICOM series folders")
    _flag(p, "--reports", "ingest.reports", help="CSV of reports keyed by volume name")
    _flag(p, "--out", "ingest.out", help="output dataset folder")
    _flag(p, "--codec", "shard.codec", choices=["npy", "lz4"], help="volume codec")
    _flag(p, "--metadata", "ingest.metadata", help="CT-RATE metadata CSV (RescaleSlope/Intercept)")
    _flag(p, "--masks", "ingest.masks", help="folder of anatomy masks with the images' file names")
    _flag(p, "--workers", "ingest.workers", type=int, help="parallel processes")
    _add_common(p)
    cmds["shard"] = cmd_shard

    p = sub.add_parser("verify", help="check a dataset's shards against its manifest",
                       description="Tar integrity, sha256, counts, index, decodability, shape/dtype, splits. "
                                   "Exits 1 naming the shard and sample of each problem.")
    p.add_argument("dir", help="dataset folder (with manifest.json)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding volumes (faster)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cmds["verify"] = cmd_verify

    p = sub.add_parser("bench", help="benchmarks; results go to benchmarks/results/ as JSON",
                       description="`ctvlp bench loader`: samples/s and MB/s of the CPU loader at the stored size, "
                                   "and each codec's compression ratio.", epilog=EPILOG)
    p.add_argument("what", choices=["loader"], help="what to benchmark")
    _flag(p, "--data", "bench.data", help="existing dataset (default: a fresh synthetic one)")
    _flag(p, "--patients", "bench.patients", type=int, help="synthetic patients when --data is not given")
    _add_common(p)
    cmds["bench"] = cmd_bench

    p = sub.add_parser("demo", help="run the main job on the embedded synthetic default",
                       description="synth -> shard -> verify -> load, on a small synthetic cohort.", epilog=EPILOG)
    _flag(p, "--out", "demo.out", help="output folder (default runs/demo)")
    _add_common(p)
    cmds["demo"] = cmd_demo

    p = sub.add_parser("config", help="show the resolved config, or list every key",
                       description="`ctvlp config show [--config F] [overrides]` prints the resolved YAML; "
                                   "`ctvlp config keys` lists every valid key.")
    p.add_argument("action", choices=["show", "keys"])
    _add_common(p)
    cmds["config"] = cmd_config
    ap.set_defaults(_cmds=cmds)
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `section.key=value` may stand anywhere after the command; argparse cannot interleave
    # a variadic positional with flags, so lift the overrides out first.
    over = [a for a in argv if OVERRIDE_RE.match(a)]
    args = ap.parse_args([a for a in argv if not OVERRIDE_RE.match(a)])
    if hasattr(args, "overrides"):
        args.overrides = over
    elif over:
        ap.error(f"ctvlp {args.command} takes no config overrides ({over[0]})")
    if not args.command:
        ap.print_help()
        return 0
    try:
        return args._cmds[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"ctvlp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
