"""The one typed config schema shared by every `ctvlp` command.

A run is a YAML file from `configs/` plus `section.key=value` overrides; see `load.py`.
Shapes and spacings are always in (D, H, W) order, i.e. (S, A, R) after RAS reorientation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data_shards.format import ANATOMY_LABELS


@dataclass
class PreprocessConfig:
    """How ingest turns a raw CT into a stored volume (recorded in the manifest)."""

    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)  # mm, (D, H, W); seed paper: 1.5 x 1.5 x 3
    stored_shape: tuple[int, int, int] = (120, 240, 240)  # crop/pad target, leaves room for 96x192x192 crops
    pad_value: int = -1024  # HU of air, used when padding
    rescale: str = "auto"  # auto | always | never: apply DICOM RescaleSlope/Intercept
    min_spacing: float = 0.1  # mm; anything outside [min, max] is rejected as absurd
    max_spacing: float = 15.0


@dataclass
class ShardConfig:
    """How samples are packed into WebDataset tar shards."""

    codec: str = "npy"  # npy (DALI CPU numpy decoder) | lz4 (raw LZ4 block, DALI GPU inflate)
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
    masks: Optional[str] = None  # optional folder of uint8 anatomy masks, same file names as images
    mask_labels: dict = field(default_factory=lambda: dict(ANATOMY_LABELS))  # name -> value in the masks
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
    """The CPU loader (`ctvlp_dist.data`); the DALI loader reads the same fields."""

    batch_size: int = 2
    num_workers: int = 2
    seed: int = 0
    shuffle: bool = True
    train: bool = True  # random crop + flips; False: centre crop/pad
    crop: tuple[int, int, int] = (96, 192, 192)
    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (2,)  # 0=D(S-I), 1=H(A-P), 2=W(R-L)
    hu_window: tuple[float, float] = (-1000.0, 200.0)
    out_range: tuple[float, float] = (-1.0, 1.0)
    last_batch: str = "pad"  # pad (repeat, flagged in batch.is_pad) | drop
    labels: Optional[str] = None  # CSV/Parquet joined by key -> batch.labels
    raw: bool = False  # yield stored int16 volumes untouched (for checks and benchmarks)
    prefetch_factor: int = 2


@dataclass
class BenchConfig:
    """`ctvlp bench ...`."""

    data: Optional[str] = None  # default: a fresh synthetic cohort in a temp folder
    patients: int = 32
    batches: int = 0  # 0 = one full epoch
    repeats: int = 3  # timed passes; the median is reported
    results_dir: str = "benchmarks/results"


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    patients: int = 24
    shape: tuple[int, int, int] = (48, 96, 96)
    spacing: tuple[float, float, float] = (6.0, 3.5, 3.5)


@dataclass
class Config:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
