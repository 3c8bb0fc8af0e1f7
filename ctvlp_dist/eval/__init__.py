"""Evaluation: metrics (`metrics.py`), streamed top-k retrieval (`retrieval.py`)."""
