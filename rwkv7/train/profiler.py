"""`RWKV7_PROFILE_STEP=N`: the torch profiler over steps N..N+2, written to profile.txt (where host and GPU time go)."""
from __future__ import annotations

from pathlib import Path

import torch

PROFILED_STEPS = 3


class StepProfiler:
    def __init__(self, first_step: int | None, out: Path):
        self.first_step, self.out = first_step, out
        self.profiler = None

    def before_step(self, step: int) -> None:
        """`step`: optimizer steps done so far (the step about to run)."""
        if self.first_step is None or step != self.first_step:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=acts)
        self.profiler.__enter__()

    def after_step(self, steps_done: int) -> None:
        if self.profiler is None or steps_done < self.first_step + PROFILED_STEPS:
            return
        self.finish()

    def finish(self) -> None:
        """Stop profiling (if it runs) and write profile.txt."""
        if self.profiler is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        self.out.write_text("\n\n".join(events.table(sort_by=key, row_limit=25)
                                        for key in ("self_cuda_time_total", "self_cpu_time_total")))
        self.profiler = None
