"""copd-jax: Co-Evolving Policy Distillation in JAX/Flax.

`kernels/` sits at the top level (the product brief fixes the layout) but is
installed as `copd_jax.kernels`, so it can never collide with the unrelated PyPI
package called `kernels`.
"""
from setuptools import setup

setup(
    name="copd-jax",
    version="0.1.0",
    description="Co-Evolving Policy Distillation (CoPD) for JAX/Flax on TPU pods",
    python_requires=">=3.10",
    packages=["copd_jax", "copd_jax.analysis", "copd_jax.data", "copd_jax.models", "copd_jax.rl", "copd_jax.sampling", "copd_jax.kernels"],
    package_dir={"copd_jax": "copd_jax", "copd_jax.kernels": "kernels"},
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.0",
        "optax>=0.2.5",  # optax.tree_utils.tree_norm
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.10",
        "ml_collections>=1.0.0",
        "tensorflow-datasets>=4.9.8",  # array_record + data_source path; no tensorflow needed
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "scipy>=1.10",  # t quantiles in experiments/stats.py (jax needs scipy too)
        "tensorboardX>=2.6",  # event files without installing tensorflow
        # Hugging Face checkpoints, tokenizers and real datasets (copd_jax/models/hf_checkpoint.py,
        # copd_jax/data/hf_tokenizer.py, copd_jax/data/records.py); none of them pulls in torch.
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "jinja2>=3.1",        # chat templates from tokenizer_config.json
        "math-verify>=0.7",   # math answer equivalence
        "pyarrow>=14",        # Parquet records
        "pillow>=10",         # image files in records
        "datasets>=2.19",     # HF datasets: load_from_disk / local JSONL+Parquet, offline
    ],
    extras_require={
        # jax[tpu] brings the libtpu that matches the installed jax: the TPU compiler that
        # tests/kernels/test_pallas_tpu.py runs deviceless on the CPU host (~700 MB).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "jax[tpu]"],
        "plots": ["matplotlib>=3.8"],
        "wandb": ["wandb>=0.17"],  # optional mirror of the logs (config.log.wandb)
    },
)
