"""configs/pod_4b.py (CoPD of Qwen3-VL-4B, three branches, the paper's batch) booked on
TPU v6e (Trillium): an 8x16 slice (128 chips, accelerator type v6e-128, 32 GiB HBM each).

Like v5e, v6e slices are 2-D with power-of-two chip counts, so `expert`=1: every branch is
sharded over all 128 chips (FSDP=32 x tensor=4), and the update and teacher scoring run
the three branches one after another (one branch's activations live at a time).
Micro-batches of 64 rows per branch (2 rows per device on the 32-way batch axis).
"""
from __future__ import annotations

from copd_jax import config_files


def get_config(preset: str = "toy"):
  del preset  # one size: the pod
  pod_4b = config_files.sibling_config(__file__, "pod_4b.py")
  return pod_4b.pod_config(tpu="v6e", topology="8x16", num_chips=128, hbm_gib=32,
                           mesh=dict(expert=1, data=1, fsdp=32, tensor=4),
                           micro_batch_rows=64, workdir="runs/pod_4b_v6e")
