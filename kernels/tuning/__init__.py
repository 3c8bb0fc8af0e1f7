"""Kernel tuning, apart from production: untimed variants of the Triton kernels (each tested
against the same references as production's), compile reports for sm_90a, probes of the GPU's
ceilings and the tuning benchmarks. Production (kernels/*.py, ctvlp_dist) never imports this
package; a variant moves into production only after a GPU run has timed it and its CUDA tests
passed on the chip (benchmarks/README.md, "GPU runs pending")."""
