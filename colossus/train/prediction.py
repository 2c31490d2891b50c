"""Every run checks the planner: at the start the cost model predicts this run's own step time and peak
memory (its layout, on this machine: the `colossus bench` profile on a CPU, the catalog on a GPU), and
at the end the run's measured figures go beside them in summary.json (`predicted`, `measured`), so
every run is a calibration point for the planner."""

from __future__ import annotations

import os
import resource
import sys
from typing import Callable

import torch

from colossus.config import RunConfig
from colossus.hardware import gpu_from_device_name
from colossus.layout import Layout
from colossus.plan.cluster import Cluster, local_cluster
from colossus.plan.costmodel import GIB, Software, eager_cpu_software, memory_breakdown, predict
from colossus.plan.profile import profile_for, typical_seconds

def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def reset_peak_resident() -> None:
    """Start this process's resident-memory high-water mark afresh (Linux: `5` to clear_refs resets
    VmHWM), so that what the process held before (tokenizing, say) does not count in the run's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # elsewhere the peak is the whole process's


def peak_resident_bytes() -> int:
    """The resident-memory high-water mark: VmHWM on Linux, else getrusage (bytes on macOS, KiB elsewhere)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PlannerCheck:
    """The planner's prediction for this run, and the run's own figures to set beside it. A prediction
    that cannot be made (no figures for this device, a failed measurement) is said, not fatal."""

    def __init__(self, config: RunConfig, layout: Layout, device: torch.device, say: Callable[[str], None]):
        self.device = device
        self.step_times: list[float] = []
        self.peak_bytes = 0  # the highest training peak sampled at a logged step
        self.cpu_profile = None
        self.predicted: dict[str, float] | None = None
        try:
            self.predicted = self._predict(config, layout, device, say)
        except Exception as exc:  # the run goes on without a prediction
            say(f"no prediction from the planner for this run: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        reset_peak_resident()
        self.baseline = resident_bytes()  # before the model is built: what the process held for nothing else

    def _predict(self, config: RunConfig, layout: Layout, device: torch.device,
                 say: Callable[[str], None]) -> dict[str, float] | None:
        m = config.model
        if device.type == "cpu":
            self.cpu_profile = profile_for(torch.get_num_threads(), layout.precision, layout.world_size, say)
            cluster = local_cluster(self.cpu_profile, layout.world_size)
            software = eager_cpu_software(m)
        else:
            gpu = gpu_from_device_name(torch.cuda.get_device_name(device))
            if gpu is None or layout.precision not in ("bf16", "fp8"):
                say(f"no prediction from the planner for this run: its catalog has no {layout.precision} figures for "
                    f"{torch.cuda.get_device_name(device)}")
                return None
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size))
            cluster = Cluster("this job", gpu, layout.world_size, per_node, 400.0)
            # FlexAttention or SDPA (no T x T scores), FSDP2's prefetching, inductor's fusions when compiled.
            software = Software(fused_attention=True, overlap_grad_reduce=True, fused_elementwise=config.train.compile,
                                persistent_grads=False)
        prediction = predict(m, cluster, layout, self.cpu_profile, software=software)
        memory = memory_breakdown(m, layout, software)
        # "reserved" is the CUDA context and allocator slack, which neither measurement below counts.
        return {"step_time_s": prediction.step_time_s, "peak_memory_gib": (sum(memory.values()) - memory["reserved"]) / GIB}

    def record_step(self, seconds: float) -> None:
        """At a logged step: the step time of its window, and the memory peak since the last forget_peak."""
        self.step_times.append(seconds)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_resident_bytes() - self.baseline
        self.peak_bytes = max(self.peak_bytes, peak)

    def forget_peak(self) -> None:
        """After a validation or a checkpoint: their own peaks (a checkpoint's serialisation buffers) are
        not training's, which is what the planner predicts."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_resident()

    def measured(self) -> dict[str, float] | None:
        """The step time and the peak memory: the step time of the logged windows after the first (which
        holds the warm-up), as `colossus bench` summarises its timings (typical_seconds: the 20th
        percentile, what the machine does when no other process takes its cores, as the profile behind
        the prediction describes it); the highest memory of the training steps (allocated on a GPU,
        resident above the pre-model baseline on a CPU), validation and checkpoints left out."""
        windows = self.step_times[1:] or self.step_times
        if not windows:  # no step was trained in this process (a finished run resumed, say)
            return None
        return {"step_time_s": typical_seconds(windows), "peak_memory_gib": max(self.peak_bytes, 0) / GIB}

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        if self.measured() is not None:
            out["measured"] = self.measured()
        if self.predicted is not None:
            out["predicted"] = self.predicted
        return out
