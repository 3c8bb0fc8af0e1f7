"""The one typed config schema shared by every `ctvlp` command.

A run is a YAML file from `configs/` plus `section.key=value` overrides; see `load.py`.
Shapes and spacings are always in (D, H, W) order, i.e. (S, A, R) after RAS reorientation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from data_shards.format import ANATOMY_LABELS


@dataclass
class PreprocessConfig:
    """How ingest turns a raw CT into a stored volume (recorded in the manifest)."""

    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)  # mm, (D, H, W); seed paper: 1.5 x 1.5 x 3
    stored_shape: tuple[int, int, int] = (120, 240, 240)  # crop/pad target, leaves room for 96x192x192 crops
    pad_value: int = -1024  # HU of air, used when padding
    rescale: Literal["auto", "always", "never"] = "auto"  # auto | always | never: apply DICOM RescaleSlope/Intercept
    min_spacing: float = 0.1  # mm; anything outside [min, max] is rejected as absurd
    max_spacing: float = 15.0


@dataclass
class ShardConfig:
    """How samples are packed into WebDataset tar shards."""

    codec: Literal["npy", "lz4"] = "npy"  # npy (DALI CPU numpy decoder) | lz4 (raw LZ4 block, DALI GPU inflate)
    max_samples: int = 64  # per shard
    max_bytes: int = 1 << 30  # per shard, soft limit
    split_fractions: dict = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    split_seed: int = 0
    label_set: str = "ctrate18"


@dataclass
class IngestConfig:
    """`ctvlp shard`: NIfTI / DICOM + report CSV -> shards."""

    images: str = ""
    reports: str = ""
    out: str = ""
    # optional folder of anatomy masks per case: <case>.nii.gz (one file) or <case>/ (per-class files)
    masks: Optional[str] = None
    mask_source: Literal["totalsegmentator", "labels"] = "totalsegmentator"  # labels: already merged maps
    mask_map: str = "fvlm4"  # totalsegmentator: classes -> anatomies (a shipped map's name or a YAML path)
    mask_labels: dict = field(default_factory=lambda: dict(ANATOMY_LABELS))  # labels: name -> value in the masks
    metadata: Optional[str] = None  # optional CSV with RescaleSlope/RescaleIntercept per volume
    key_column: str = "VolumeName"
    findings_column: str = "Findings_EN"
    impressions_column: str = "Impressions_EN"
    text_column: Optional[str] = None  # a single report column instead of findings + impressions
    patient_regex: str = r"^(?P<patient>[A-Za-z]+_\d+)_(?P<study>[A-Za-z]+)"  # CT-RATE: train_12_a_1
    workers: int = 2


@dataclass
class SynthConfig:
    """`ctvlp synth`: the embedded synthetic chest-CT cohort."""

    patients: int = 32
    out: str = ""
    seed: int = 0
    scans_per_patient: int = 1
    shape: Optional[tuple[int, int, int]] = None  # default: preprocess.stored_shape
    spacing: Optional[tuple[float, float, float]] = None  # default: preprocess.spacing
    raw: bool = False  # write NIfTI files + reports CSV at real CT-RATE spacings instead of shards
    raw_scale: float = 1.0  # shrink raw volumes (for tests); 1.0 = real CT-RATE sizes
    noise_hu: float = 12.0
    workers: int = 2


@dataclass
class LoaderConfig:
    """Both loaders (`ctvlp_dist.data.build_loader`): the torch DataLoader and the DALI pipeline."""

    backend: Literal["auto", "torch", "dali"] = "auto"  # auto: DALI on a GPU host with DALI installed, else torch
    batch_size: int = 2
    num_workers: int = 2
    worker_type: Literal["thread", "process"] = "thread"  # torch backend: worker threads (no shared-memory batches) or DataLoader processes
    seed: int = 0
    shuffle: bool = True
    train: bool = True  # random crop + flips; False: centre crop/pad
    crop: tuple[int, int, int] = (96, 192, 192)
    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (2,)  # 0=D(S-I), 1=H(A-P), 2=W(R-L)
    hu_window: tuple[float, float] = (-1000.0, 200.0)
    out_range: tuple[float, float] = (-1.0, 1.0)
    last_batch: Literal["pad", "drop"] = "pad"  # pad (repeat, flagged in batch.is_pad) | drop
    labels: Optional[str] = None  # CSV/Parquet joined by key -> batch.labels
    organ_texts: Optional[str] = None  # fVLM: `ctvlp label split`'s Parquet joined by key -> batch.organ_text
    text_view: Literal["report", "sentence"] = "report"  # report | sentence: one random sentence per sample and epoch (train only; data/text.py)
    raw: bool = False  # yield stored int16 volumes untouched (for checks and benchmarks)
    prefetch_factor: int = 2  # torch: batches per worker in flight; DALI: prefetch queue depth
    dali_shuffle_buffer: int = 64  # DALI random_shuffle's initial_fill (samples mixed on each rank)


@dataclass
class BenchConfig:
    """`ctvlp bench ...`."""

    data: Optional[str] = None  # default: a fresh synthetic cohort in a temp folder
    patients: int = 32
    batches: int = 0  # 0 = one full epoch
    loader_backends: tuple[Literal["torch", "dali"], ...] = ("torch", "dali")  # bench loader (--backend)
    loader_baselines: bool = True  # bench loader: also one .npz / .npy file per scan through a torch DataLoader
    loader_worker_types: tuple[Literal["thread", "process"], ...] = ("thread", "process")  # bench loader: torch worker kinds
    repeats: int = 3  # timed passes; the median is reported
    label_reports: int = 100  # bench label: dev reports to label
    label_scorings: tuple[Literal["yesno", "json"], ...] = ("yesno", "json")
    model_config: Optional[str] = None  # bench label: e.g. llama-3.1-8b (with dummy weights); default: real SmolLM2
    dummy_weights: bool = False  # vLLM load_format="dummy": throughput without weights
    loss_sizes: tuple[int, ...] = (1024, 4096, 16384)  # bench loss: batch sizes b
    loss_dim: int = 512
    loss_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"  # GPU; CPU runs float32
    loss_methods: tuple[Literal["dense", "chunked", "triton"], ...] = ("dense", "chunked", "triton")
    loss_inputs: Literal["random", "mixed"] = "random"  # bench loss: random (initialisation) or mixed (trained pairs, scale 100)
    conv_batch: int = 8  # bench conv (GPU): scans per layer call
    conv_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"  # bench conv (GPU); CPU checks agreement in float32
    conv_parts: tuple[Literal["layers", "blocks", "tower"], ...] = ("layers", "blocks", "tower")  # bench conv
    conv_compile: bool = True  # bench conv tower (GPU): also torch.compile(mode="max-autotune") of the torch tower
    train_steps: int = 6  # bench train: optimizer steps of the real loop (the first is warm-up)
    train_crop: Optional[tuple[int, int, int]] = None  # default: loader.crop on GPU, (32, 64, 64) on CPU
    train_micro: int = 2  # bench train: GradCache micro-batch (the plain step runs loader.batch_size at once)
    train_max_batch: bool = False  # bench train (GPU): double the GradCache batch until memory runs out
    results_dir: str = "benchmarks/results"
    out: str = "runs/bench"  # benchmark by-products (e.g. the labels a bench label run wrote)


@dataclass
class LabelConfig:
    """`ctvlp label`: silver labels from reports (rules or vLLM engines under Ray)."""

    reports: str = ""  # shard dataset folder or CSV
    out: str = ""  # labels.parquet
    backend: Literal["rules", "vllm"] = "rules"  # rules | vllm
    model: Optional[str] = None  # HF model folder; default: SmolLM2-135M-Instruct (ctvlp label prepare-model)
    label_set: str = "ctrate18"
    key_column: Optional[str] = None  # CSV: default detects AccessionNo / VolumeName / key
    text_column: Optional[str] = None  # CSV: default detects report_text, or Findings_EN + Impressions_EN
    scoring: Literal["yesno", "json"] = "yesno"  # yesno: P(yes) per finding | json: schema-constrained JSON, value-token logprobs
    engines: int = 1  # vLLM engine actors; 0: fill the Ray cluster, one per tensor_parallel_size GPUs of each node
    batch_size: int = 8  # reports per engine call
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    max_tokens: int = 320  # json scoring: generation budget (doubled on each retry)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    load_format: Literal["auto", "dummy"] = "auto"  # "dummy": random weights, for throughput benchmarks
    threads_per_engine: int = 2  # CPU engines
    retries: int = 2  # re-asks for an output that does not parse or validate
    max_worker_restarts: int = 3  # per engine actor, after a crash
    limit: int = 0  # label only the first N reports (0: all)
    threshold: float = 0.5  # probability -> hard label 1; within `uncertain_band` of it -> -1
    uncertain_band: float = 0.0
    price_per_gpu_hour: float = 2.0  # USD, for the 50k-report cost estimate
    seed: int = 0
    # `ctvlp label split`: per-anatomy report text (fVLM)
    silver: str = ""  # the silver labels (Parquet from `ctvlp label`): an organ is normal when none of its findings is positive
    anatomy_map: str = "fvlm4"  # the anatomies to split into (data_shards/resources/anatomy/, or a YAML path)
    truth: Optional[str] = None  # sentence_truth.jsonl (the synthetic cohort's): score the split against it


@dataclass
class ModelConfig:
    """A CT-CLIP model: 3D ResNet-18 image tower, HF text tower, shared latent and heads.
    Variants are YAML files in configs/, not code."""

    stem: Literal["standard", "k2s2", "k4s4"] = "k2s2"  # standard (7^3 stride 2 + max-pool) | k2s2 (seed paper) | k4s4 (lite)
    norm: Literal["bn", "gn"] = "bn"  # bn | gn
    gn_groups: int = 32
    channels_last: bool = True  # channels_last_3d memory format
    conv_impl: Literal["torch", "triton"] = "torch"  # torch (cuDNN/oneDNN) or triton (kernels/conv3d.py; CPU: TRITON_INTERPRET=1)
    width: int = 64  # first-stage channels of the image tower (stages double it); 64 = the paper
    text_model: Optional[str] = None  # HF folder; default: the bundled all-MiniLM-L6-v2
    text_pooling: Literal["mean", "cls"] = "mean"  # mean | cls
    text_max_length: int = 256
    text_trainable_layers: int = -1  # train only the top N transformer layers of the text tower (-1: all)
    latent_dim: int = 512
    logit_scale_init: float = 14.285714  # 1 / 0.07, as CLIP
    logit_scale_max: float = 100.0
    num_labels: int = 18  # the shared classifier for the auxiliary BCE (0: none)
    anatomies: tuple[str, ...] = ()  # fVLM: organs with an embedding each, by mask name (empty: none)
    organ_width: int = 256  # fVLM pooling: the common width of layers 2-4's positions
    organ_heads: int = 8  # fVLM pooling: heads of the shared attention


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine schedule (the seed paper: lr 1e-4 supervised, 1e-5 clip; wd 1e-4)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4  # not applied to norms, biases and the logit scale (open_clip's rule)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off


@dataclass
class TrainConfig:
    """`ctvlp train`: one stage on N workers (Ray Train, torchrun/deepspeed, or one local process).

    The micro-batch is loader.batch_size (samples per worker per forward pass). global_batch is the
    samples per optimizer step over all workers, independent of both: for the clip stage it is the
    contrastive batch, reached with GradCache when it exceeds micro-batch x workers; for supervised,
    with gradient accumulation."""

    stage: Literal["supervised", "clip", "fvlm"] = "supervised"  # supervised | clip | fvlm (per-organ contrastive; needs model.anatomies, loader.organ_texts)
    data: str = ""  # shard dataset folder (`ctvlp shard` / `ctvlp synth`); labels come from loader.labels
    split: str = "train"
    out: str = "runs/train"  # checkpoints/, metrics.jsonl, model.safetensors, summary.json
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over the split
    epochs: int = 1
    global_batch: int = 0  # 0 = micro-batch x workers (no accumulation, no GradCache)
    uncertain: Literal["ignore", "positive", "negative"] = "ignore"  # ignore | positive | negative: what a -1 (uncertain) silver label means
    text_bce: bool = False  # supervised: also train the text tower on the labels
    aux_weight: float = 0.0  # clip: weight of the auxiliary BCE through the shared classifier
    aux_text: bool = True  # clip: the auxiliary BCE on the text latents too (off for loader.text_view=sentence)
    group_identical_texts: bool = False  # clip: identical texts are positives of each other (fVLM calibration)
    fvlm_global_weight: float = 0.0  # fvlm: weight of the report-level CLIP term beside the organ terms
    fvlm_drop_cut: bool = True  # fvlm: an organ that touches a face of the random crop takes no part (fVLM)
    init_from: Optional[str] = None  # a model.safetensors export (e.g. the supervised stage) to start from
    bn_mode: Literal["train", "eval"] = "train"  # train | eval: frozen BN statistics (GradCache then equals the full batch exactly)
    lock_image: bool = False  # clip, fvlm: freeze the image tower, BN statistics included (open_clip --lock-image; LiT); fvlm still trains its organ pooling
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    launcher: Literal["ray", "local"] = "ray"  # ray (Ray Train TorchTrainer) | local (one process); torchrun/deepspeed run `python -m ctvlp_dist.train.worker`
    workers: int = 2  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: int = 1
    ray_address: Optional[str] = None  # default: RAY_ADDRESS, else a local cluster
    max_failures: int = 0  # Ray FailureConfig: restarts of the worker group, each resuming from the last checkpoint
    ckpt_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (the latest checkpoint of this run, if any) | none | a checkpoint folder
    seed: int = 0
    deterministic: bool = True  # torch deterministic algorithms (bit-exact resume on CPU)
    threads_per_worker: int = 1
    log_every: int = 1  # steps between JSONL lines
    progress: bool = True
    export: bool = True  # write model.safetensors (weights + config) at the end
    peak_tflops: float = 0.0  # device peak for MFU; 0 = known GPUs by name, none on CPU


@dataclass
class EvalConfig:
    """`ctvlp eval`: zero-shot diagnosis, retrieval and an optional linear probe on one split."""

    checkpoint: str = ""  # model.safetensors (from `ctvlp train`), or a run folder holding one
    data: str = ""  # shard dataset folder
    gold: Optional[str] = None  # reference labels joined by key; default: <data>/ground_truth.csv, else loader.labels (flagged as silver)
    split: str = "test"
    out: str = "runs/eval"
    label_set: str = "ctrate18"
    ensemble: bool = True  # average the prompt embeddings over the four templates
    template: int = 0  # the template used without ensemble (0: "There is {f}." / "There is no {f}.")
    uncertain: Literal["positive", "negative"] = "positive"  # how a -1 reference label counts (positive | negative)
    bootstrap: int = 1000  # resamples for the macro AUC's 95% interval (0: none)
    map_ks: tuple[int, ...] = (1, 5, 10, 50)
    recall_ks: tuple[int, ...] = (1, 5, 10, 50, 100)
    linear_probe: bool = False  # logistic regression on frozen image embeddings of probe_split
    probe_split: str = "train"
    runs: tuple[str, ...] = ()  # training run folders: their metrics.jsonl give the loss-curve plot
    batch_size: int = 4
    seed: int = 0
    organ_min_inside: float = 0.9  # fVLM models: an organ under this share inside the evaluated crop is skipped


@dataclass
class EmbedConfig:
    """`ctvlp embed`: a cohort's image and report embeddings by sample key, streamed to disk."""

    checkpoint: str = ""  # model.safetensors (from `ctvlp train`), or a run folder holding one
    data: str = ""  # shard dataset folder
    split: Optional[str] = None  # one split, or every split (null)
    out: str = ""  # FILE.parquet, or a folder with format=npy
    format: Literal["parquet", "npy"] = "parquet"
    batch_size: int = 8


@dataclass
class DemoConfig:
    """`ctvlp demo`: synth -> shards -> labels (rules + vLLM) -> supervised -> CLIP -> eval. The
    defaults are configs/demo.yaml's, which `ctvlp demo` loads when no --config is given."""

    out: str = "runs/demo"
    patients: int = 1600
    shape: tuple[int, int, int] = (16, 32, 32)
    spacing: tuple[float, float, float] = (18.0, 10.5, 10.5)
    vllm_reports: int = 8  # reports labelled by the real vLLM engine (SmolLM2-135M on CPU); 0 = skip
    supervised_steps: int = 1000
    clip_steps: int = 600
    clip_lr: float = 3.0e-3  # the CLIP stage's optim.lr (0: the same as supervised); the seed paper: 10x lower
    workers: int = 2  # Ray Train workers of both stages


@dataclass
class KernelsConfig:
    """Launch configurations of the Triton kernels (kernels/), for a user who wants other tiles
    than each op's measured rule (contrastive_triton.clip_tiles, conv3d.conv_tiles). Empty: the
    rule. Passed down as arguments; untimed kernel variants live in kernels/tuning/, not here."""

    clip_fwd_tiles: Optional[tuple[int, int, int, int, int, int]] = None  # BM, BN, BK, BD, warps, stages
    clip_bwd_tiles: Optional[tuple[int, int, int, int, int, int, bool]] = None  # ..., full: whole d per tile
    conv_fwd_tile: Optional[tuple[int, int, int, int, int]] = None  # BM, BN, BK, warps, stages (conv_impl=triton)
    conv_dgrad_tile: Optional[tuple[int, int, int, int, int]] = None
    conv_wgrad_tile: Optional[tuple[int, int, int, int, int]] = None


@dataclass
class LaunchConfig:
    """`ctvlp launch slurm`: the allocation of the sbatch script and what runs on it
    (launcher/slurm.py). Values in #SBATCH lines must be single words (sbatch parses them, not
    bash); everything else in the script is shell-quoted."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 0  # --cpus-per-task of the one task per node, and Ray's --num-cpus there (0: SLURM's default)
    workers_per_node: int = 0  # training workers per node: 0 = gpus_per_node, or 1 without GPUs
    mem: str = ""  # per node, e.g. 256G ("": the partition's default)
    time: str = ""  # the time limit, e.g. 24:00:00 ("": the partition's default)
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclusive: bool = False
    job_name: str = "ctvlp"
    output: str = "runs/slurm"  # on shared storage: <output>/<job id>.out (the log) and <output>/<job id>/ (token, node script)
    setup: tuple[str, ...] = ()  # shell lines run first (module load, source venv/bin/activate); empty: this Python's venv
    engine: Literal["ray", "ray-symmetric", "torchrun"] = "ray"  # ray: ray start per node | ray-symmetric: ray symmetric-run | torchrun (train only)
    ray_port: int = 0  # first of the job's 1000 ports; 0: 20000 + (job id % 10) x 1000, so jobs sharing a node differ
    ray_tmpdir: str = "/tmp/ctvlp-ray"  # node-local; the job uses <ray_tmpdir>/<job id>/<node index>
    node_wait_s: int = 300  # how long the job waits for every node to join Ray
    requeue: bool = True  # on SIGUSR1 (time limit or preemption near) stop with a checkpoint, then `scontrol requeue`
    signal_grace_s: int = 300  # --signal=B:USR1@<grace>: seconds of warning before the time limit
    rdzv_port: int = 29500  # torchrun's c10d rendezvous on the head node
    metrics_addr: str = "node"  # metrics.addr of the job's exporters: node (each node's address), 127.0.0.1, or an address


@dataclass
class MetricsConfig:
    """Prometheus exporters (ctvlp_dist/observe/): every process of a job (each training rank, the
    label and ingest drivers) serves its metrics and announces itself in <run>/metrics/targets/."""

    port: int = 0  # 0: any free port; N > 0: N + the local rank; -1: no exporter
    addr: str = "127.0.0.1"  # bind address; "node": this node's address (what `ctvlp launch` sets on a cluster)
    job: Optional[str] = None  # the `job` label of every series; default: the run folder's name
    linger_s: float = 0.0  # keep serving this long after the job ends, so the last values are scraped


@dataclass
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
