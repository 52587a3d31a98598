"""Where routed experts live: stores (RAM, disk), the device slot cache, router-predicted prefetch, the planner.

`build_experts` is the one entry point `lite.loader` uses (its options: offload/build.py); `ExpertBackend` is the
interface the model calls; the rest is in the modules (docs/DESIGN.md, "offload/").
"""

from offload.backend import ExpertBackend
from offload.build import build_experts
from offload.engine import ExpertEngine
from offload.experts import ExpertStacks
from offload.resident import ResidentExperts

__all__ = ["ExpertBackend", "ExpertEngine", "ExpertStacks", "ResidentExperts", "build_experts"]
