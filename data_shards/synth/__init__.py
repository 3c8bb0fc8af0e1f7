"""The embedded synthetic chest-CT cohort: phantoms, visible findings, CT-RATE-style reports."""
