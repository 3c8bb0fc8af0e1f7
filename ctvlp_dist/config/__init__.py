"""Typed configuration: `schema.py` defines it, `load.py` reads YAML + overrides."""
from .load import ConfigError, config_from_dict, config_to_dict, load_config, parse_overrides, valid_keys
from .schema import (BenchConfig, Config, DemoConfig, EvalConfig, IngestConfig, LabelConfig, LoaderConfig, MetricsConfig,
                     ModelConfig, OptimConfig, PreprocessConfig, ShardConfig, SynthConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "load_config", "parse_overrides", "config_to_dict", "config_from_dict",
           "valid_keys", "PreprocessConfig", "ShardConfig", "IngestConfig", "SynthConfig", "LoaderConfig",
           "BenchConfig", "DemoConfig", "EvalConfig", "LabelConfig", "MetricsConfig", "ModelConfig", "OptimConfig", "TrainConfig"]
