"""Nsight Compute's view of one gather-cols call against our rows kernel on the same bytes made contiguous (v11).

The v10 probe fitted gather-cols (fc2) at ~7 us fixed per call against ~4 us for the rows kernel on the gathered
matrix, with the marginal bytes streamed at about the copy bandwidth by both. This runs, after autotuning outside
the profiled range, inside the NVTX range ``probe``:
- ``cols``: ``gather_cols_gemv`` on OPT-13B's fc2 at s=0.5 (the split launch and its reduce kernel);
- ``rows_gathered``: the rows kernel on those selected weights copied to one contiguous [E, k] matrix;
- ``rows_fc1_s07``: ``gather_rows_gemv`` on OPT-13B's fc1 at s=0.7 (a rows case below 85%).

    ncu --nvtx --nvtx-include "probe/" --clock-control none --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --section WarpStateStats \\
        python3 benchmarks/v11_ncu.py
"""

from __future__ import annotations

import torch

from models.ops import _gemv_triton
from shadow_kernels import gather_cols_gemv, gather_rows_gemv


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    E, F = 5120, 20480
    wt = torch.randn(F, E, device=dev, generator=g, dtype=torch.float16) * F**-0.5
    idx = torch.randperm(F, device=dev, generator=g)[: F // 2].sort().values.to(torch.int32)
    h = torch.randn(F // 2, device=dev, generator=g, dtype=torch.float16)
    w_g = wt.index_select(0, idx.long()).T.contiguous()  # [E, k]
    w1 = torch.randn(F, E, device=dev, generator=g, dtype=torch.float16) * E**-0.5
    idx1 = torch.randperm(F, device=dev, generator=g)[: int(F * 0.3)].sort().values.to(torch.int32)
    x = torch.randn(E, device=dev, generator=g, dtype=torch.float16)
    calls = {"cols": lambda: gather_cols_gemv(wt, h, idx), "rows_gathered": lambda: _gemv_triton(w_g, h),
             "rows_fc1_s07": lambda: gather_rows_gemv(w1, x, idx1, None, "relu")}
    for f in calls.values():  # autotune and compile outside the profiled range
        f()
    torch.cuda.synchronize()
    for name, f in calls.items():
        torch.cuda.nvtx.range_push("probe")
        torch.cuda.nvtx.range_push(name)
        f()
        torch.cuda.nvtx.range_pop()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    print("done", {k: v for k, v in (("cols", "split + reduce"), ("rows_gathered", E), ("rows_fc1_s07", idx1.numel()))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
