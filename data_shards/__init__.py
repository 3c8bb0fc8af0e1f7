"""Writing, indexing and verifying CT WebDataset shards, and the synthetic cohort.

Data flows: ingest/synth -> `writer.DatasetWriter` -> tar shards + DALI index + manifest.json
-> `ctvlp_dist.data` (reader). `verify.py` checks a dataset against its manifest.
"""
