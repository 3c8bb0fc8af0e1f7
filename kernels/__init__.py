"""Triton kernels, each with its torch reference, its autograd function and its tests beside it
(Liger-Kernel style). Model code asks for an op by name through `ctvlp_dist` and does not know
whether Triton or torch runs it."""
