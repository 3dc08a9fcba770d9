"""configs/pod_4b.py (CoPD of Qwen3-VL-4B, three branches, the paper's batch) booked on
TPU v5e: a full 16x16 pod (256 chips, accelerator type v5litepod-256, 16 GiB HBM each).

v5e slices are 2-D and their chip counts (powers of two) are not multiples of 3, so the
three branches cannot each own a third of the slice: `expert`=1, and every branch is
sharded over all 256 chips (FSDP=64 x tensor=4; the branch axis stays a vmapped axis on
every chip). Teacher scoring then exchanges rows on-chip instead of across expert groups.
Micro-batches of 64 rows per branch (1 row per device on the 64-way batch axis, for each
of the 3 branches) keep activations within 16 GiB.
"""
from __future__ import annotations

import importlib.util
import os


def _pod_4b():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pod_4b.py")
  spec = importlib.util.spec_from_file_location("_pod_4b_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(preset: str = "toy"):
  del preset  # one size: the pod
  return _pod_4b().pod_config(tpu="v5e", topology="16x16", num_chips=256, hbm_gib=16,
                              mesh=dict(expert=1, data=1, fsdp=64, tensor=4),
                              micro_batch_rows=64, workdir="runs/pod_4b_v5e")
