"""configs/pod_4b.py (CoPD of Qwen3-VL-4B, three branches, the paper's batch) booked on
TPU v6e (Trillium): an 8x16 slice (128 chips, accelerator type v6e-128, 32 GiB HBM each).

Like v5e, v6e slices are 2-D with power-of-two chip counts, so `expert`=1: every branch is
sharded over all 128 chips (FSDP=32 x tensor=4). Micro-batches of 64 rows per branch
(2 rows per device on the 32-way batch axis, for each of the 3 branches).
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
  return _pod_4b().pod_config(tpu="v6e", topology="8x16", num_chips=128, hbm_gib=32,
                              mesh=dict(expert=1, data=1, fsdp=32, tensor=4),
                              micro_batch_rows=64, workdir="runs/pod_4b_v6e")
