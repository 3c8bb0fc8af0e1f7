"""`ctvlp shard`: raw CT (NIfTI / DICOM series) + report CSV -> verified-format shards."""
