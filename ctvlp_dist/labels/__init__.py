"""Silver labels from reports: sources -> backend (rules | vllm) -> Parquet; and their evaluation.

Runs beside the data path and joins it by sample key (`loader.labels=labels.parquet`).
"""
