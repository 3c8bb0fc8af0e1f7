"""The contrastive loss's GPU sweep lists: loss_gpu.py times them, preflight.py compiles them
for sm_90a beforehand. Forward and backward tiles "BM,BN,BK,BD,warps,stages[,flag[,maxnreg]]";
panel configurations "G tile;GEMM tile" (kernels/tuning/panel.py). Flag 0 tiles run production's
loop (kernels/contrastive_triton.py); the others are kernels/tuning/loss_variants.py's options."""

# The 2026-11-22 sweep (results/loss-sweep-gpu-20261122T180000.json) already ranked the plain
# tiles: only its winners stay, as the same-run baselines (first in each list), beside the
# options no GPU has timed: FACTOR (flag 1), a program per row block (2), TMA loads (4), copies
# through L1 (8), and an eighth number capping the registers, so that two 8-warp programs (or
# three 4-warp ones) share an SM: each capped tile follows its uncapped twin
FWD = ["64,128,64,128,4,3", "64,128,64,128,4,3,0,168", "64,128,64,128,4,3,1", "128,128,32,128,8,4,1",
       "128,64,64,128,8,3,1", "64,128,64,128,4,3,2", "128,64,64,128,4,3,2", "128,128,64,128,8,3,2",
       "64,64,64,128,4,3,2", "64,128,64,128,8,3,2", "64,128,64,128,8,3,2,128", "128,64,64,128,4,3,3",
       "128,128,64,128,8,3,3", "64,128,64,128,4,3,4", "64,128,64,128,4,3,5", "128,128,64,128,8,3,4",
       "64,64,64,128,4,3,6", "64,128,64,128,8,3,6", "64,128,64,128,8,3,6,128", "64,128,64,128,4,3,8",
       "64,128,64,128,4,3,9", "128,64,64,128,4,3,10", "128,64,64,128,4,3,7"]
# (a FULL tile with 3 stages needs 263 KB of shared memory, more than a block may have)
BWD = ["64,64,64,512,8,2,1", "64,64,64,512,8,2,5"]

# (G tile; GEMM tile) of the panel backward, swept at b = 16,384 against the two-pass backward
PANEL = ["128,64,64,8,3;128,128,64,8,3", "128,128,64,8,3;128,128,64,8,3", "128,64,64,8,4;128,256,64,8,3",
         "64,128,64,4,3;128,128,64,8,4", "128,64,32,8,4;128,128,64,8,3", "128,128,64,8,3;128,256,64,8,3",
         "128,64,64,8,3,1;128,128,64,8,3", "128,128,64,8,3,1;128,128,64,8,3", "128,128,64,8,3,1,128;128,128,64,8,3",
         "64,128,64,4,3,1;128,128,64,8,4"]
