"""The tiny model config shared by the model, experts and sampling tests."""
import functools

from copd_jax.models import model_config as M

IMG = 3  # placeholder token id in the tiny config


def tiny_config(**overrides) -> M.ModelConfig:
  fields = dict(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=64, image_token_id=IMG,
                vision=dict(image_size=16, patch_size=8, num_frames=4, tubelet=2, width=16,
                            depth=1, num_heads=2, mlp_dim=32))
  fields.update(overrides)
  return M.ModelConfig(**fields)


@functools.lru_cache(maxsize=None)
def one_device_run(model_cfg):
  """The RunSharding of a single-device run of model_cfg (a mesh of size 1, as
  rl.methods.run_sharding builds it), one per config: the sampler and the update take it
  as a static argument, so reusing it reuses their compiled programs."""
  from copd_jax import policy_setup, sharding
  return sharding.RunSharding.one_device(policy_setup.declared_param_axes(model_cfg))


def update_traces(monkeypatch) -> list:
  """A list that grows by one each time rl.update's program is traced (which is when it
  compiles): a second step of a stage must leave it as it was."""
  from copd_jax.rl import update as update_lib
  traces, real = [], update_lib.update_body

  def counting(*args, **kwargs):
    traces.append(1)
    return real(*args, **kwargs)
  monkeypatch.setattr(update_lib, "update_body", counting)
  return traces
