"""`ctvlp <command>`: every command reads the same typed config (YAML + key=value overrides)."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from . import __version__
from .config import Config, ConfigError, config_to_dict, load_config, valid_keys

OVERRIDE_RE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")
EPILOG = ("Every command also takes --config FILE.yaml and trailing section.key=value overrides, "
          "e.g. `ctvlp synth --out d loader.batch_size=4`. `ctvlp config keys` lists all keys.")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see configs/); flags and overrides win over it")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _flag(p, name, key, **kw):
    """A convenience flag that is just an override of config key `key`."""
    if "choices" not in kw and kw.get("action") is None:
        kw.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
    p.add_argument(name, dest=key.replace(".", "__"), default=None, **kw)


def _keys_epilog(*sections: str) -> str:
    """The sections' keys with their defaults, read from the schema, so that --help never goes stale."""
    defaults = config_to_dict(Config())
    # JSON is YAML, the syntax of an override's value: lists as [a, b], None as null.
    keys = [f"{s}.{k}={json.dumps(v)}" for s in sections for k, v in defaults[s].items()]
    return f"Keys, with their defaults: {', '.join(keys)}. " + EPILOG


# `ctvlp demo` without --config runs this recipe, the one `make demo`, the README and the
# benchmarks describe.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _cfg(args):
    over = list(args.overrides or [])
    for k, v in vars(args).items():
        if "__" in k and v is not None:
            over.append(f"{k.replace('__', '.')}={v}")
    path = args.config
    if path is None and args.command == "demo":
        if not DEMO_CONFIG.exists():
            raise FileNotFoundError(f"the demo recipe {DEMO_CONFIG} is missing: run from a checkout of the "
                                    "repository, or pass --config FILE.yaml")
        path = DEMO_CONFIG
    return load_config(path, over)


def resolve_config(argv: list[str]) -> Config:
    """The Config that `ctvlp ARGV...` would run with (its --config, flags and overrides)."""
    over = [a for a in argv if OVERRIDE_RE.match(a)]
    args = build_parser().parse_args([a for a in argv if not OVERRIDE_RE.match(a)])
    args.overrides = over
    return _cfg(args)


def _final_line(summary: dict) -> str:
    return (f"cases in: {summary['cases_in']} = samples written: {summary.get('samples_written', summary.get('files_written'))}"
            f" + rejected: {summary['rejected']}")


def _case_metrics(cfg, out: str, stage: str):
    """The ingest exporter of a synth or shard job, and the writer's hook that feeds it."""
    from .observe import Exporter
    from .observe.catalog import REJECT_REASONS, classify

    ex = Exporter(cfg.metrics, out, "ingest", stage)

    def on_case(outcome: str, reason):
        ex.m["ctvlp_ingest_cases_total"].labels(outcome).inc()
        if reason is not None:
            ex.m["ctvlp_ingest_rejects_total"].labels(classify(reason, REJECT_REASONS)).inc()
    return ex, on_case


def _close_exporter(ex, linger_s: float) -> None:
    if ex is None:
        return
    if linger_s > 0 and ex.port is not None:
        time.sleep(linger_s)  # one more scrape sees the final values
    ex.close()


def cmd_synth(args) -> int:
    from data_shards.synth.cohort import run_synth

    cfg = _cfg(args)
    ex, on_case = _case_metrics(cfg, cfg.synth.out, "synth") if cfg.synth.out and not cfg.synth.raw else (None, None)
    try:
        s = run_synth(cfg, progress=not args.quiet, on_case=on_case)
    finally:
        _close_exporter(ex, cfg.metrics.linger_s)
    print(json.dumps(s))
    print(_final_line(s))
    return 0


def cmd_shard(args) -> int:
    from data_shards.ingest.pipeline import run_ingest

    cfg = _cfg(args)
    for k in ("images", "reports", "out"):
        if not getattr(cfg.ingest, k):
            raise ConfigError(f"ctvlp shard needs --{k} (or ingest.{k}=...)")
    ex, on_case = _case_metrics(cfg, cfg.ingest.out, "ingest")
    try:
        s = run_ingest(cfg, progress=not args.quiet, on_case=on_case)
    finally:
        _close_exporter(ex, cfg.metrics.linger_s)
    print(json.dumps(s))
    if s["rejected"] or s["patient_id_fallbacks"]:
        print(f"rejects, patient-id fallbacks and reasons: {s['out']}/ingest_report.json")
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
    elif args.what == "loss":
        from .bench import loss as bench_loss

        bench_loss.run(cfg, progress=not args.quiet, argv=sys.argv)
    elif args.what == "train":
        from .bench import train as bench_train

        bench_train.run(cfg, progress=not args.quiet, argv=sys.argv)
    elif args.what == "conv":
        from .bench import conv as bench_conv

        bench_conv.run(cfg, progress=not args.quiet, argv=sys.argv)
    elif args.what == "label":
        from .bench import label as bench_label

        bench_label.run(cfg, progress=not args.quiet, argv=sys.argv)
    return 0


def cmd_label(args) -> int:
    if args.label_cmd == "eval":
        from .labels.evaluate import evaluate_labels

        evaluate_labels(args.pred, args.gold, args.json, args.uncertain, args.label_set)
        return 0
    if args.label_cmd == "prepare-model":
        from .labels.model_prep import prepare_model

        print(prepare_model(args.out, force=args.force))
        return 0
    if args.label_cmd == "split":
        return _label_split(args)
    from .labels.runner import run_label

    s = run_label(_cfg(args), progress=not args.quiet)
    from .records import markdown_table

    keys = ["reports_per_s", "prompt_tokens_per_s", "generated_tokens_per_s", "device_hours_per_50k_reports",
            "cost_usd_per_50k_reports", "worker_restarts"]
    print(markdown_table([{k: s[k] for k in keys}], keys))
    print(json.dumps(s))
    print(f"reports in: {s['reports_in']} = labelled ok: {s['ok']} + failed: {s['failed']} "
          f"+ skipped (already labelled): {s['skipped_already_labelled']}")
    if s["damaged_label_parts"]:
        print(f"damaged label parts, their reports labelled again: {', '.join(s['damaged_label_parts'])}")
    return 0


def _label_split(args) -> int:
    from .labels.split import split_table
    from .labels.split_run import run_split

    s = run_split(_cfg(args), progress=not args.quiet)
    score = s.pop("score", None)
    if score is not None:
        print(split_table(score))
        if args.json:
            Path(args.json).write_text(json.dumps(score, indent=1))
        s["accuracy"] = score["accuracy"]
    print(json.dumps(s))
    print(f"reports in: {s['reports_in']} = split ok: {s['ok']} + failed: {s['failed']} "
          f"(reused from an earlier run: {s['skipped_already_split']})")
    return 0


def cmd_train(args) -> int:
    from .records import markdown_table
    from .train.launch import train

    cfg = _cfg(args)
    if args.quiet:
        cfg.train.progress = False
    s = train(cfg)
    last = s.get("last") or {}
    keys = ["steps", "final_loss", "samples_per_s", "scans_per_s_per_worker", "step_s", "data_s", "forward_s",
            "backward_s", "optimizer_s", "mfu"]
    print(markdown_table([{k: _fmt(s.get(k, last.get(k))) for k in keys}], keys))
    print(json.dumps(s))
    if s.get("stopped"):
        from .train.stop import EXIT_CODES

        print(f"stopped on request ({s['stopped']}) after step {s['steps']} of {s['total_steps']}, with a checkpoint; "
              f"run the same command again (train.resume=auto) to go on")
        return EXIT_CODES[s["stopped"]]
    print(f"{s['steps']} steps of {s['stage']} on {s['workers']} workers; weights: {s['export']}; "
          f"metrics: {cfg.train.out}/metrics.jsonl")
    return 0


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def cmd_eval(args) -> int:
    from .records import markdown_table
    from .eval.runner import evaluate_model

    if args.deprecated_labels:
        print("ctvlp eval: --labels is deprecated, use --gold (it names the gold reference labels)", file=sys.stderr)
        args.eval__gold = args.eval__gold or args.deprecated_labels
    m = evaluate_model(_cfg(args), progress=not args.quiet)
    zs, rt = m["zero_shot"], m["retrieval"]
    head = {"zero-shot macro AUC": f"{zs['macro_auc']:.3f}", "weighted F1": f"{zs['weighted']['f1']:.3f}",
            "MAP@50 (image-image)": f"{rt['image_image'].get('map_at_50', float('nan')):.3f}",
            "Recall@100 (report-image)": f"{rt['report_image'].get('recall_at_100', float('nan')):.3f}"}
    print(markdown_table([head], list(head)))
    print(f"report: {Path(m['plots'].get('auc', '.')).parent / 'report.md'}; metrics.json beside it")
    return 0


def cmd_embed(args) -> int:
    from .eval.cohort_embed import run_embed

    s = run_embed(_cfg(args), progress=not args.quiet)
    print(json.dumps(s))
    print(f"embedded {s['samples']} samples (d = {s['dim']}) -> {s['out']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(_cfg(args), progress=not args.quiet)


def cmd_observe(args) -> int:
    from .observe.discovery import scrape_config, start_prometheus

    runs = [Path(r) for r in args.runs]
    text = scrape_config(runs, args.interval)
    print(text, end="")
    if not args.serve:
        return 0
    home = runs[0] / "metrics"
    home.mkdir(parents=True, exist_ok=True)
    (home / "prometheus.yml").write_text(text)
    proc = start_prometheus(home / "prometheus.yml", home / "prometheus", args.port)
    print(f"prometheus on http://127.0.0.1:{args.port} (data and log in {home / 'prometheus'}); Ctrl-C stops it",
          flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def cmd_config(args) -> int:
    cfg = _cfg(args)
    if args.action == "keys":
        print("\n".join(valid_keys()))
    else:
        print(yaml.safe_dump(json.loads(json.dumps(config_to_dict(cfg))), sort_keys=False))
    return 0


def cmd_launch(args) -> int:
    from launcher.cli import main as launch_main

    return launch_main([args.target, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ctvlp", description="Train CT vision-language models at scale: "
                                 "shards -> loader -> model -> loss -> engine -> metrics.", epilog=EPILOG)
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="<command>")
    cmds: dict[str, Callable] = {}

    p = sub.add_parser("synth", help="generate the synthetic chest-CT cohort (straight to shards, or raw NIfTI)",
                       description="Deterministic chest-CT phantoms with the 18 CT-RATE findings rendered visibly, "
                                   "anatomy masks and CT-RATE-style reports; ground truth in ground_truth.csv.",
                       epilog=_keys_epilog("synth"))
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
                       epilog=_keys_epilog("ingest", "shard", "preprocess"))
    _flag(p, "--images", "ingest.images", help="folder of .nii/.nii.gz files and/or DICOM series folders")
    _flag(p, "--reports", "ingest.reports", help="CSV of reports keyed by volume name")
    _flag(p, "--out", "ingest.out", help="output dataset folder")
    _flag(p, "--codec", "shard.codec", choices=["npy", "lz4"], help="volume codec")
    _flag(p, "--metadata", "ingest.metadata", help="CT-RATE metadata CSV (RescaleSlope/Intercept)")
    _flag(p, "--masks", "ingest.masks", help="anatomy masks per case: <case>.nii.gz (TotalSegmentator --ml) or <case>/ (its per-class files); merged by ingest.mask_map (default fvlm4)")
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
                       description="`ctvlp bench loader`: scans/s and GB/s of the torch and DALI loaders at the stored size, "
                                   "per codec, against one .npz / .npy file per scan through a torch DataLoader, "
                                   "and each codec's compression ratio. `ctvlp bench label`: vLLM reports/s and macro "
                                   "AUC on dev reports, per scoring method. `ctvlp bench loss`: contrastive loss time and memory, "
                                   "dense vs chunked vs Triton. `ctvlp bench train`: image-tower "
                                   "scans/s, step-time breakdown, peak memory and MFU; GradCache vs plain time per scan. `ctvlp bench conv`: "
                                   "the Triton conv3d vs cuDNN per tower layer, block and the whole tower (GPU; CPU checks "
                                   "agreement only). Kernel tuning lives in kernels/tuning/ (benchmarks/README.md).",
                       epilog=_keys_epilog("bench", "kernels"))
    p.add_argument("what", choices=["loader", "label", "loss", "train", "conv"], help="what to benchmark")
    _flag(p, "--data", "bench.data", help="existing dataset (default: a fresh synthetic one)")
    _flag(p, "--patients", "bench.patients", type=int, help="synthetic patients when --data is not given")
    _flag(p, "--backend", "bench.loader_backends", metavar="torch|dali|[torch,dali]",
          type=lambda v: v if v.startswith("[") else f"[{v}]",
          help="loader: which loader backends to time (default both)")
    _flag(p, "--model-config", "bench.model_config", help="label: architecture with dummy weights, e.g. llama-3.1-8b")
    p.add_argument("--dummy-weights", dest="bench__dummy_weights", action="store_const", const="true", default=None,
                   help="label: vLLM load_format=dummy (throughput without weights)")
    _add_common(p)
    cmds["bench"] = cmd_bench

    p = sub.add_parser("label", help="silver labels from reports (rules, or vLLM engines under Ray); eval",
                       description="`ctvlp label --reports SRC --out labels.parquet --backend {rules,vllm}` labels every "
                                   "report; `ctvlp label eval --pred P --gold CSV` scores labels against hand labels; "
                                   "`ctvlp label prepare-model` converts the bundled SmolLM2 for vLLM.",
                       epilog=_keys_epilog("label"))
    _flag(p, "--reports", "label.reports", help="shard dataset folder or CSV of reports")
    _flag(p, "--out", "label.out", help="output Parquet file")
    _flag(p, "--backend", "label.backend", choices=["rules", "vllm"], help="labeler")
    _flag(p, "--model", "label.model", help="HF model folder for vllm (default: bundled SmolLM2-135M-Instruct)")
    _flag(p, "--key-column", "label.key_column", help="CSV key column (default: AccessionNo / VolumeName / key)")
    _flag(p, "--text-column", "label.text_column", help="CSV report column (default: report_text or Findings_EN+Impressions_EN)")
    _flag(p, "--label-set", "label.label_set", help="label set name or YAML path (default ctrate18)")
    _flag(p, "--engines", "label.engines", type=int, help="vLLM engine workers")
    _flag(p, "--scoring", "label.scoring", choices=["yesno", "json"], help="how vllm scores each finding")
    _add_common(p)
    lsub = p.add_subparsers(dest="label_cmd", metavar="[split|eval|prepare-model]")
    sp = lsub.add_parser("split", help="per-anatomy report text for fVLM (rules or vLLM), scored on sentence truth",
                         description="`ctvlp label split --reports SRC --silver labels.parquet --out split.parquet` cuts "
                                     "each report into sentences and assigns each to an anatomy of label.anatomy_map "
                                     "(default fvlm4: lung, heart, aorta, esophagus) or to other; an organ with no "
                                     "positive silver finding gets the text '<Organ> shows no significant "
                                     "abnormalities.'. Resumable like `ctvlp label`. --truth scores it per anatomy.",
                         epilog=_keys_epilog("label"))
    _add_common(sp)
    _flag(sp, "--reports", "label.reports", help="shard dataset folder or CSV of reports")
    _flag(sp, "--silver", "label.silver", help="silver labels Parquet from `ctvlp label` (decides the normal organs)")
    _flag(sp, "--out", "label.out", help="output Parquet file")
    _flag(sp, "--backend", "label.backend", choices=["rules", "vllm"], help="splitter")
    _flag(sp, "--model", "label.model", help="HF model folder for vllm (default: bundled SmolLM2-135M-Instruct)")
    _flag(sp, "--anatomy-map", "label.anatomy_map", help="anatomies: a shipped map's name or a YAML path (default fvlm4)")
    _flag(sp, "--truth", "label.truth", help="sentence_truth.jsonl to score against (the synthetic cohort writes one)")
    sp.add_argument("--json", help="with --truth: write the score JSON here")
    e = lsub.add_parser("eval", help="score labels against hand labels",
                        description="Per finding AUC (probabilities), F1/precision/recall (hard labels) and support; "
                                    "macro and micro; markdown table and JSON (macro_auc, macro_f1 at the top).")
    e.add_argument("--pred", required=True, help="labels Parquet from `ctvlp label`")
    e.add_argument("--gold", required=True, help="CSV: key column (AccessionNo/VolumeName/key) + one 0/1 column per finding")
    e.add_argument("--json", help="write the metrics JSON here")
    e.add_argument("--uncertain", default="positive", choices=["positive", "negative", "ignore"],
                   help="how hard label -1 counts for F1/precision/recall (default positive, CheXpert U-ones)")
    e.add_argument("--label-set", help="label set (default: the one recorded in the Parquet)")
    m = lsub.add_parser("prepare-model", help="convert the bundled SmolLM2-135M-Instruct GGUF for vLLM (cached)")
    m.add_argument("--out", help="target folder (default ~/.cache/ctvlp/models/smollm2-135m-instruct)")
    m.add_argument("--force", action="store_true", help="convert again")
    cmds["label"] = cmd_label

    p = sub.add_parser("train", help="train a stage (supervised BCE or CLIP) with DeepSpeed, under Ray Train",
                       description="`ctvlp train --config configs/train_clip_seed.yaml train.data=SHARDS` runs one stage "
                                   "on train.workers Ray Train workers (train.launcher=local: one process here; "
                                   "torchrun/deepspeed: `torchrun -m ctvlp_dist.train.worker --config ...`). Writes "
                                   "checkpoints, metrics.jsonl, summary.json and model.safetensors under train.out; "
                                   "resumes from the latest checkpoint of train.out by default.",
                       epilog=_keys_epilog("train", "optim", "kernels"))
    _flag(p, "--data", "train.data", help="shard dataset folder")
    _flag(p, "--labels", "loader.labels", help="silver labels (Parquet/CSV from `ctvlp label`)")
    _flag(p, "--organ-texts", "loader.organ_texts", help="fvlm: per-organ texts (Parquet from `ctvlp label split`)")
    _flag(p, "--out", "train.out", help="run folder (checkpoints, metrics, export)")
    _flag(p, "--stage", "train.stage", choices=["supervised", "clip", "fvlm"], help="objective")
    _flag(p, "--steps", "train.steps", type=int, help="optimizer steps (0: train.epochs passes)")
    _flag(p, "--workers", "train.workers", type=int, help="Ray Train workers")
    _flag(p, "--launcher", "train.launcher", choices=["ray", "local"], help="ray (default) or one local process")
    _add_common(p)
    cmds["train"] = cmd_train

    p = sub.add_parser("eval", help="evaluate an exported model: zero-shot diagnosis, retrieval, linear probe",
                       description="`ctvlp eval --checkpoint RUN_OR_SAFETENSORS --data SHARDS [--gold FILE] [--out DIR]`: "
                                   "zero-shot AUC per finding (bootstrap CI), F1/sensitivity/specificity/precision at the "
                                   "ROC point closest to (0,1), image-image MAP@K, report-image Recall@K; writes "
                                   "metrics.json, report.md and PNG plots to --out.",
                       epilog=_keys_epilog("eval"))
    _flag(p, "--checkpoint", "eval.checkpoint", help="model.safetensors from `ctvlp train`, or its run folder")
    _flag(p, "--data", "eval.data", help="shard dataset folder")
    _flag(p, "--gold", "eval.gold", help="gold reference labels (default: <data>/ground_truth.csv; else the "
                                          "training labels, flagged as silver in the report)")
    p.add_argument("--labels", dest="deprecated_labels", default=None, help=argparse.SUPPRESS)
    _flag(p, "--out", "eval.out", help="output folder")
    _flag(p, "--split", "eval.split", help="split to evaluate (default test)")
    _add_common(p)
    cmds["eval"] = cmd_eval

    p = sub.add_parser("embed", help="write a cohort's image and report embeddings by sample key (Parquet or npy)",
                       description="Evaluation's embedding (centre crops, every sample once) streamed to disk in "
                                   "memory bounded by the batch: Parquet rows (key, split, image, report) or a folder "
                                   "of npy arrays with keys.txt.", epilog=_keys_epilog("embed"))
    _flag(p, "--checkpoint", "embed.checkpoint", help="model.safetensors, or the run folder holding it")
    _flag(p, "--data", "embed.data", help="shard dataset folder")
    _flag(p, "--out", "embed.out", help="FILE.parquet, or a folder with --format npy")
    _flag(p, "--split", "embed.split", help="one split (default: every split)")
    _flag(p, "--format", "embed.format", choices=["parquet", "npy"])
    _add_common(p)
    cmds["embed"] = cmd_embed

    p = sub.add_parser("demo", help="run the main job on the embedded synthetic default",
                       description="synth -> shards -> verify -> silver labels (rules + vLLM, scored against the truth) -> "
                                   "supervised -> CLIP (2 Ray Train workers) -> eval; report in demo.out.",
                       epilog=_keys_epilog("demo"))
    _flag(p, "--out", "demo.out", help="output folder (default runs/demo)")
    _add_common(p)
    cmds["demo"] = cmd_demo

    p = sub.add_parser("launch", help="run any command on a SLURM cluster (sbatch), or try a multi-node Ray here",
                       description="`ctvlp launch slurm [--dry-run] <command> ...` renders and submits an sbatch "
                                   "script from the config's launch: section; `ctvlp launch slurm status|cancel|logs "
                                   "JOBID`; `ctvlp launch ray-local --nodes N [-- command]`. `ctvlp launch slurm "
                                   "--help` and `ctvlp launch ray-local --help` say more.",
                       epilog=_keys_epilog("launch"))
    p.add_argument("target", choices=["slurm", "ray-local"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the target's arguments")
    cmds["launch"] = cmd_launch

    p = sub.add_parser("observe", help="Prometheus scrape configuration for run folders; --serve runs Prometheus on them",
                       description="Every process of a job announces its metrics endpoint in <run>/metrics/targets/ "
                                   "(file-based service discovery). This prints the prometheus.yml that scrapes "
                                   "those folders; with --serve it starts Debian's prometheus on loopback against "
                                   "them. The Grafana dashboard is dashboards/ctvlp.json.")
    p.add_argument("runs", nargs="+", help="run folders: train.out, the label output's folder, synth/shard --out")
    p.add_argument("--serve", action="store_true", help="start prometheus (must be installed) on these runs")
    p.add_argument("--port", type=int, default=9090, help="prometheus's port on 127.0.0.1 (with --serve)")
    p.add_argument("--interval", default="15s", help="scrape interval")
    cmds["observe"] = cmd_observe

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
    if argv[:1] == ["launch"] and len(argv) > 1 and argv[1] in ("slurm", "ray-local"):
        return _guarded("launch", lambda: cmd_launch(argparse.Namespace(target=argv[1], rest=argv[2:])))
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
    return _guarded(args.command, lambda: args._cmds[args.command](args))


def _guarded(command: str, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"ctvlp {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
