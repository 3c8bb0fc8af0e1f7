"""Let a kernel's async copies allocate in L1.

Triton lowers every 16-byte `cp.async` to `.cg`, which bypasses L1, whatever `tl.load`'s
`cache_modifier` says (checked with Triton 3.6.0 and 3.7.1). For the convolutions' implicit GEMM
that matters: each activation is read once per tap, and neighbouring taps read nearly the same
lines, so at layer1 a forward moves about 14-19 GB through L2 (bench_conv.fwd_l2_bytes),
where L1 hits could serve the kw-neighbours' re-reads. The mark survives to the TTGIR
(`cacheModifier = ca` on the async copy), and the PTX ISA allows 16-byte `cp.async.ca`. So
`install()` adds a compile-stage hook: in a kernel whose TTGIR marks an async copy `.ca`, every
16-byte `cp.async.cg` of the PTX becomes `cp.async.ca` (the mark does not reach the PTX per
instruction, so the kernel's other copies, such as the weight tile's, change too). Kernels
without the mark are untouched. The mark is a constexpr of the kernel, so the two versions are
cached apart.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

_COPY_CA = re.compile(r"async_copy_global_to_local[^\n]*cacheModifier = ca")
# Triton 3.7 adds this to its cache keys: a change to this file recompiles what it rewrote
_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
_KEY = (f"ctvlp-l1-copies-{_DIGEST}", _DIGEST)
_previous = None


def rewrite_ptx(ptx: str) -> str:
    """Every async copy that bypasses L1 made to allocate in it (same size, same operands)."""
    return ptx.replace("cp.async.cg.shared.global", "cp.async.ca.shared.global")


def _hook(*args):
    """Triton's add_stages_inspection_hook: with no arguments (Triton 3.7), the part of the cache
    key it adds; else it wraps the backend's ttgir and ptx stages of this compilation."""
    if not args:
        prev = _previous() if _previous is not None else ("", "")
        return prev[0] + _KEY[0], prev[1] + _KEY[1]
    if _previous is not None:
        _previous(*args)
    stages = args[1]
    if "ttgir" not in stages or "ptx" not in stages:
        return
    make_ttgir, make_ptx = stages["ttgir"], stages["ptx"]
    marked = {}

    def ttgir(src, metadata):
        mod = make_ttgir(src, metadata)
        marked["l1"] = bool(_COPY_CA.search(str(mod)))
        return mod

    def ptx(src, metadata):
        out = make_ptx(src, metadata)
        return rewrite_ptx(out) if marked.get("l1") else out

    stages["ttgir"], stages["ptx"] = ttgir, ptx


def install() -> None:
    """Add the hook once per process, keeping (and calling) any hook already installed."""
    global _previous
    from triton import knobs

    current = knobs.runtime.add_stages_inspection_hook
    if current is _hook:
        return
    _previous = current
    knobs.runtime.add_stages_inspection_hook = _hook
