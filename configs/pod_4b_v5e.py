"""configs/pod_4b.py (CoPD of Qwen3-VL-4B, three branches, the paper's batch) booked on
TPU v5e: a full 16x16 pod (256 chips, accelerator type v5litepod-256, 16 GiB HBM each).

v5e slices are 2-D and their chip counts (powers of two) are not multiples of 3, so the
three branches cannot each own a third of the slice: `expert`=1, and every branch is
sharded over all 256 chips (FSDP=64 x tensor=4; every chip holds its share of each
branch). Teacher scoring then exchanges rows on-chip instead of across expert groups.
As every chip holds all three branches, the update and teacher scoring run the branches
one after another (models.partitioning.map_over_branches), so one branch's activations
are live at a time. Micro-batches of 64 rows per branch (1 row per device on the 64-way
batch axis) keep them within 16 GiB.
"""
from __future__ import annotations

from copd_jax import config_files


def get_config(preset: str = "toy"):
  del preset  # one size: the pod
  pod_4b = config_files.sibling_config(__file__, "pod_4b.py")
  return pod_4b.pod_config(tpu="v5e", topology="16x16", num_chips=256, hbm_gib=16,
                           mesh=dict(expert=1, data=1, fsdp=64, tensor=4),
                           micro_batch_rows=64, workdir="runs/pod_4b_v5e")
