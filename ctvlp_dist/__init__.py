"""ctvlp_dist: CT vision-language pretraining at scale."""
__version__ = "0.1.0"
