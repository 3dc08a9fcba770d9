"""The policy: a Qwen3-layout decoder LM with a small vision encoder (Flax linen).

Everything a caller needs is a pure function of `(params, cfg, arrays)`:

    params = init_params(cfg, key)                       # f32 pytree
    hidden = forward_hidden(params, cfg, tokens, positions, token_mask, vision)
    logits = logits_from_hidden(hidden, lm_head(params, cfg))

`forward_hidden` returns final-normed hidden states rather than logits, because the fused
loss kernels take (hidden, head) and never materialise [tokens x vocab].

The sampler (copd_jax.sampling) uses three more: `prefill` (the prompt pass, returning its
keys/values), `init_decode_cache` (those keys become a prefix shared by the G samples of
each prompt) and `decode_step` + `write_decode_cache` (one token per row per step).

Sequences
---------
Prompts are LEFT-padded so every prompt ends in the same column and decoding starts
together. `positions = cumsum(token_mask) - 1` clipped at 0 (see `positions_from_mask`),
so padding never shifts rotary positions. Attention is causal and ignores padded keys;
hidden states AT padded positions are finite but meaningless.

Vision
------
Every vision input is a clip of exactly `VisionConfig.num_frames` frames (a still image
is that image repeated), encoded into exactly `VisionConfig.num_tokens` embeddings. They
replace the `image_token_id` placeholder tokens in order: the k-th placeholder of a row
gets the k-th embedding of that row's clip. A vision prompt must therefore hold exactly
`num_tokens` placeholders; rows without placeholders are untouched. Placeholders take
ordinary 1-D rotary positions (no multimodal RoPE).

Parameter names and the Hugging Face Qwen3 mapping
--------------------------------------------------
Names follow HF Qwen3 so a checkpoint maps one-to-one (`kernel` = HF `weight`
TRANSPOSED, i.e. [in, out]; norms' `scale` = HF `weight` as is):

    embed_tokens/embedding [V, D]                  <- model.embed_tokens.weight
    layers_{i}/input_layernorm/scale [D]           <- model.layers.{i}.input_layernorm.weight
    layers_{i}/self_attn/q_proj/kernel [D, H*Dh]   <- model.layers.{i}.self_attn.q_proj.weight.T
    layers_{i}/self_attn/k_proj/kernel [D, K*Dh]   <- ...self_attn.k_proj.weight.T
    layers_{i}/self_attn/v_proj/kernel [D, K*Dh]   <- ...self_attn.v_proj.weight.T
    layers_{i}/self_attn/o_proj/kernel [H*Dh, D]   <- ...self_attn.o_proj.weight.T
    layers_{i}/self_attn/q_norm/scale [Dh]         <- ...self_attn.q_norm.weight
    layers_{i}/self_attn/k_norm/scale [Dh]         <- ...self_attn.k_norm.weight
    layers_{i}/post_attention_layernorm/scale [D]  <- ...post_attention_layernorm.weight
    layers_{i}/mlp/gate_proj/kernel [D, M]         <- ...mlp.gate_proj.weight.T
    layers_{i}/mlp/up_proj/kernel [D, M]           <- ...mlp.up_proj.weight.T
    layers_{i}/mlp/down_proj/kernel [M, D]         <- ...mlp.down_proj.weight.T
    norm/scale [D]                                 <- model.norm.weight
    lm_head/kernel [D, V]  (untied only)           <- lm_head.weight.T

With ModelConfig.scan_layers the layers run under one nn.scan and their parameters are
stacked: `layers/self_attn/q_proj/kernel [L, D, H*Dh]` etc. instead of `layers_{i}/...`.
`layer_stack.stack_layers` / `unstack_layers` convert (HF import and export use the
unrolled layout).

The vision tower loosely follows Qwen3-VL names (`visual/patch_embed`, `visual/pos_embed`,
`visual/blocks_{i}/{norm1,qkv,proj,norm2,linear_fc1,linear_fc2}`,
`visual/merger/{norm,linear_fc1,linear_fc2}`) but is a plain ViT over tubelets without
spatial merging, so it does not load Qwen3-VL vision weights as is.

Numerics: parameters are f32. Matmul inputs are cast to `cfg.dtype` (bf16 or f32) with f32
accumulation (`preferred_element_type`); the residual stream, norms, softmax and rotary
embeddings stay in f32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from copd_jax.models import lora, partitioning
from copd_jax.models.layers import Linear, RMSNorm, SwiGLU, rope_angles, rotate_with_angles
from copd_jax.models.model_config import ModelConfig
from copd_jax.models.toy_vision import VisionEncoder, replace_placeholders
# Attention arithmetic and the KV cache live in cached_attention; LayerCache,
# in_query_blocks and write_slots stay importable from here.
from copd_jax.models.cached_attention import (  # noqa: F401 (re-exported)
    LayerCache, _attend_prefix_and_slots, _attend_with_shared_prefix, _dense_attention,
    _splash_attention, in_query_blocks, write_slots)

# The logical name of the leading layer axis of scanned (stacked) layer parameters.
LAYER_AXIS = "layers"

Params = Any  # a nested dict of f32 arrays

class Attention(nn.Module):
  """Grouped-query attention with Qwen3 q/k RMSNorm and RoPE.

  Without `cache`: keys are this call's tokens, causally; mask: the key mask bool[N, T].
  With `cache` (a LayerCache, read only): keys are the shared prompt prefix, the filled
  response slots and this call's tokens (causally); mask = (prefix_mask bool[B, P],
  filled_slots bool[R]). Queries run in blocks of cfg.attention_block (in_query_blocks), or,
  with cfg.uses_splash_attention and no filled response slots (training, teacher scoring),
  through the Pallas splash kernel (_splash_attention). Reading
  the prefix once per prompt rather than once per sample is what makes G samples cheap.
  Returns (out f32[N, T, D], this call's (k, v) [N, K, T, Dh]) -- what a prefill keeps
  and what a decode step writes into its cache.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, angles, mask, cache=None):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    n, t, _ = x.shape
    heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = Linear(heads * hd, dt, axes=("embed", "heads"), name="q_proj")(x).reshape(
        n, t, heads, hd)
    k = Linear(kv_heads * hd, dt, axes=("embed", "kv_heads"), name="k_proj")(x).reshape(
        n, t, kv_heads, hd)
    v = Linear(kv_heads * hd, dt, axes=("embed", "kv_heads"), name="v_proj")(x).reshape(
        n, t, kv_heads, hd)
    q = rotate_with_angles(RMSNorm(cfg.rms_norm_eps, ("head_dim",), name="q_norm")(q), angles)
    k = rotate_with_angles(RMSNorm(cfg.rms_norm_eps, ("head_dim",), name="k_norm")(k), angles)
    k, v = k.astype(dt), v.astype(dt)
    # Group query heads by the kv head they share: [N, T, K, H/K, Dh].
    q = (q.reshape(n, t, kv_heads, heads // kv_heads, hd) * (hd ** -0.5)).astype(dt)
    # Masks are built per block of queries from their indices (causal among this call's
    # tokens), so no [T, T] array of a whole sequence exists with cfg.attention_block.
    def causal(query_index):  # bool[block, T]
      return jnp.arange(t)[None, :] <= query_index[:, None]

    if cache is not None and len(mask) == 3 and cache.k.shape[2]:
      # Decoding: the new keys go into their response slots first (in place: the old
      # slots are never read again), then attention reads the updated slots only, so
      # the loop carries one copy of the cache and returns it (no second one per step).
      prefix_mask, _, write_index = mask
      k_slots = write_slots(cache.k, k.transpose(0, 2, 1, 3), write_index)
      v_slots = write_slots(cache.v, v.transpose(0, 2, 1, 3), write_index)
      # One write, read by attention and carried: without the barrier XLA duplicates the
      # write into the attention's operand fusion, and each copy needs its own buffer.
      k_slots, v_slots = jax.lax.optimization_barrier((k_slots, v_slots))
      updated = cache.replace(k=k_slots, v=v_slots)
      r = cache.k.shape[2]

      def attend_slots(qb, query_index):  # query i sits at slot write_index + i
        visible = jnp.arange(r)[None, :] <= write_index + query_index[:, None]
        return _attend_prefix_and_slots(qb, updated, (prefix_mask, visible))
      out = in_query_blocks(attend_slots, q, cfg.attention_block)
      out = Linear(cfg.d_model, dt, axes=("heads", "embed"), name="o_proj")(
          out.reshape(n, t, heads * hd))
      return out, (k_slots, v_slots)
    if cfg.uses_splash_attention and (cache is None or cache.k.shape[2] == 0):
      out = _splash_attention(q, k, v, cache, mask, cfg.attention_block or 512)
    else:
      if cache is None:
        def attend(qb, query_index):
          return _dense_attention(qb, k, v, causal(query_index)[None] & mask[:, None, :])
      else:
        prefix_mask, filled_slots = mask[:2]

        def attend(qb, query_index):
          return _attend_with_shared_prefix(qb, k, v, cache,
                                            (prefix_mask, filled_slots, causal(query_index)))
      out = in_query_blocks(attend, q, cfg.attention_block)
    out = Linear(cfg.d_model, dt, axes=("heads", "embed"), name="o_proj")(
        out.reshape(n, t, heads * hd))
    return out, (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, angles, mask, cache=None):
    cfg = self.cfg
    h, kv = Attention(cfg, name="self_attn")(
        RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x), angles, mask, cache)
    x = x + h
    x = x + SwiGLU(cfg.mlp_dim, cfg.d_model, cfg.compute_dtype, name="mlp")(
        RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x))
    return x, kv


class Decoder(nn.Module):
  """The Qwen3 decoder every policy shares: token embedding, decoder layers over rotary
  angles the caller computes, final norm, and (untied) LM head. Subclasses add their
  inputs: Policy (1-D positions, optional toy vision tower) and models.qwen3_vl.Qwen3VL
  (multimodal positions, the Qwen3-VL vision tower, DeepStack features).

  embedding_std: the std of the random embedding init (None: d_model ** -0.5).
  constrain: None, or constrain(x) -> x called on the residual stream x [rows, T, D] after
    the embedding and after each layer (sharding.RunSharding.constrain_rows while the
    update is traced: without it XLA's partitioner may follow the FSDP-sharded embedding
    table (d_model over `fsdp`) and gather every row of a micro-batch onto every device).
  """
  cfg: ModelConfig
  embedding_std: float | None = None
  constrain: Callable | None = None

  def constrain_activations(self, x):
    return x if self.constrain is None else self.constrain(x)

  def setup(self):
    cfg = self.cfg
    std = cfg.d_model ** -0.5 if self.embedding_std is None else self.embedding_std
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32, name="embed_tokens",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(std),
                                                    ("vocab", "embed")))
    # Inside a scan, remat's CSE barrier is not needed (the scan already keeps XLA from
    # merging the recomputation with the forward pass) and only costs speed.
    layer = (nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers) if cfg.remat
             else DecoderLayer)
    if cfg.scan_layers:
      self.layers = layer(cfg, name="layers")  # one module, parameters [L, ...] (nn.scan)
    else:
      self.layers = [layer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, name="norm")
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.vocab_size, jnp.float32, axes=("embed", "vocab"),
                            name="lm_head")

  def embed(self, tokens):
    """int32[N, T] -> f32[N, T, D]."""
    return self.embed_tokens(tokens).astype(jnp.float32)

  def decode(self, x, angles, key_mask, cache=None, write_index=0, after_layer=None):
    """The layers over input embeddings x f32[N, T, D] with rotary angles f32[N, T, Dh/2].

    Without `cache`: key_mask bool[N, T]; attention is causal and skips padded keys.
    With `cache` (a tuple of LayerCache over layers, read only): key_mask is the prompts'
    prefix mask bool[B, P] with N = B*G; the new tokens sit at response slots
    write_index .. write_index+T-1 and see every valid prefix key, the response slots
    before write_index and each other causally.
    after_layer(i, x) -> x, if given, runs after layer i (DeepStack adds features there);
    with cfg.scan_layers, i is a traced int32 scalar, not a Python int.
    Returns (final-normed hidden f32[N, T, D], per-layer (k, v) [N, K, T, Dh]).

    With cfg.scan_layers the layers run under nn.scan: "per-layer" tuples (the cache, the
    returned keys/values) hold ONE entry whose arrays have a leading layer axis L
    (LayerCache prefix [L, B, K, P, Dh], (k, v) [L, N, K, T, Dh]).
    """
    x = self.constrain_activations(x)
    if cache is None:
      mask = key_mask  # [N, T]; attention adds causality
    else:
      filled_slots = jnp.arange(cache[0].k.shape[-2]) < write_index  # [R]
      mask = (key_mask, filled_slots)
    if self.cfg.scan_layers:
      return self._scanned_layers(x, angles, mask, cache, after_layer)
    if cache is not None:  # unscanned layers write their new keys into the slots in place
      mask = (key_mask, filled_slots, write_index)
    new_kv = []
    for i, layer in enumerate(self.layers):
      x, kv = layer(x, angles, mask, None if cache is None else cache[i])
      if after_layer is not None:
        x = after_layer(i, x)
      x = self.constrain_activations(x)
      new_kv.append(kv)
    return self.norm(x), tuple(new_kv)

  def _scanned_layers(self, x, angles, mask, cache, after_layer):
    """decode's layers as one nn.scan over the stacked layer parameters [L, ...]."""
    constrain = self.constrain_activations

    def body(layer, x, per_layer):
      i, layer_cache = per_layer
      x, kv = layer(x, angles, mask, layer_cache)
      if after_layer is not None:
        x = after_layer(i, x)
      return constrain(x), kv

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=self.cfg.num_layers,
                   metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
    x, kv = scan(self.layers, x, (jnp.arange(self.cfg.num_layers, dtype=jnp.int32),
                                  None if cache is None else cache[0]))
    return self.norm(x), (kv,)


class Policy(Decoder):
  """The text policy (Qwen3, or the toy model with its tubelet vision tower): returns
  (final-normed hidden f32[N, T, D], per-layer (k, v) [N, K, T, Dh] of this call's tokens).

  tokens, positions: int32[N, T]; key_mask and cache as in Decoder.decode; vision:
  f32[N, F, H, W, C] or None (replaces the image_token_id placeholders). Write the new
  tokens' keys into a cache with write_decode_cache.
  """

  def setup(self):
    super().setup()
    if self.cfg.vision is not None:
      self.visual = VisionEncoder(self.cfg.vision, self.cfg.d_model, self.cfg.compute_dtype,
                                  name="visual")

  def __call__(self, tokens, positions, key_mask, vision=None, cache=None, write_index=0):
    cfg = self.cfg
    x = self.embed(tokens)
    if vision is not None:
      # Rows of the (sharded) vision tower's output pinned like the residual stream's, so
      # the placeholder gather stays on each device's own rows.
      vision_embeds = self.constrain_activations(self.visual(vision))
      x = replace_placeholders(x, tokens, vision_embeds, cfg.image_token_id)
    angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    return self.decode(x, angles, key_mask, cache, write_index)

  def init_all(self, tokens, positions, key_mask, vision=None):
    """Creates every parameter, including the untied head (unused by __call__)."""
    hidden, _ = self(tokens, positions, key_mask, vision)
    if not self.cfg.tie_embeddings:
      self.lm_head(hidden)
    return hidden


def positions_from_mask(token_mask):
  """bool[B, T] -> int32[B, T]: cumsum(mask) - 1 clipped at 0 (padding does not shift RoPE)."""
  return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _boxed_params(cfg: ModelConfig, key):
  """The init's parameters with their partitioning metadata (nn.LogicallyPartitioned)."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  vision = None
  if cfg.vision is not None:
    v = cfg.vision
    vision = jnp.zeros((1, v.num_frames, v.image_size, v.image_size, v.channels), jnp.float32)
  variables = Policy(cfg).init(key, tokens, jnp.zeros((1, 2), jnp.int32),
                               jnp.ones((1, 2), bool), vision, method=Policy.init_all)
  return variables["params"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _init(cfg: ModelConfig, key):
  return partitioning.unbox(_boxed_params(cfg, key))


def init_params(cfg: ModelConfig, key) -> Params:
  """Fresh f32 parameters (a nested dict of plain arrays named as in the module docstring)."""
  cfg.validate()
  return _init(cfg, key)


@functools.lru_cache(maxsize=32)
def param_axes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str | None, ...]]:
  """{parameter path: the logical axes its layer declares}, from an abstract init (nothing
  allocated). Scanned layers' parameters lead with LAYER_AXIS. Raises
  partitioning.UndeclaredAxesError naming any parameter created without axes."""
  cfg.validate()
  boxed = jax.eval_shape(lambda k: _boxed_params(cfg, k), jax.random.key(0))
  return partitioning.declared_axes(boxed)


def check_inputs(cfg: ModelConfig, tokens, positions, token_mask, vision) -> None:
  """Shape checks with errors naming the argument (runs at trace time, costs nothing)."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be int[B, T], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array, got dtype {tokens.dtype}")
  for name, arr in (("positions", positions), ("token_mask", token_mask)):
    if arr.shape != tokens.shape:
      raise ValueError(f"{name} must have the shape of tokens {tokens.shape}, got {arr.shape}")
  if vision is None:
    return
  if cfg.vision is None:
    raise ValueError("vision was given but ModelConfig.vision is None (a text-only model)")
  v = cfg.vision
  want = (tokens.shape[0], v.num_frames, v.image_size, v.image_size, v.channels)
  if tuple(vision.shape) != want:
    raise ValueError(f"vision must be f32[B, num_frames, H, W, C] = {want}, got "
                     f"{tuple(vision.shape)}")


@functools.partial(jax.jit, static_argnames=("cfg", "constrain"))
def forward_hidden(params: Params, cfg: ModelConfig, tokens, positions, token_mask,
                   vision=None, constrain: Callable | None = None):
  """Final-normed hidden states f32[B, T, D] (hidden at t predicts token t+1).

  tokens: int32[B, T]; positions: int32[B, T] (see positions_from_mask);
  token_mask: bool[B, T] (False = padding, never attended to);
  vision: f32[B, F, H, W, C] or None (replaces the image_token_id placeholders);
  constrain: the residual stream's constraint (Decoder.constrain), static.
  """
  check_inputs(cfg, tokens, positions, token_mask, vision)
  hidden, _ = Policy(cfg, constrain=constrain).apply(lora.variables(params), tokens, positions,
                                token_mask.astype(bool), vision)
  return hidden


@functools.partial(jax.jit, static_argnames=("cfg", "constrain"))
def forward_hidden_shared_prefix(params: Params, cfg: ModelConfig, prompt_tokens,
                                 prompt_positions, prompt_mask, vision, tokens, positions,
                                 constrain: Callable | None = None):
  """Teacher forcing of G continuations per prompt with the prompt run ONCE, not G times.

  prompt_tokens, prompt_positions: int32[B, P]; prompt_mask: bool[B, P];
  vision: f32[B, F, H, W, C] or None (the prompts' media: the vision tower runs once per
  prompt); tokens, positions: int32[N, R], N = B*G, row b*G + j continues prompt b.
  Returns (prompt hidden f32[B, P, D], continuation hidden f32[N, R, D]).

  Equal to forward_hidden on the rows [prompt b | continuation] (up to float rounding):
  the prompt's columns never see the continuation (causal), and each continuation token
  sees the valid prompt tokens and the continuation's tokens up to itself. The
  continuation has no key mask: padding after a stop token is seen only by later padding,
  whose outputs nobody reads. Continuations are plain tokens: a vision placeholder in them
  is not replaced (the sampler never generates one, see SamplingConfig.banned_token_ids). For G = 8 samples of a 64-token prompt with 24 new tokens
  this runs 16 x 64 + 128 x 24 tokens instead of 128 x 88: 2.75x fewer.
  """
  check_inputs(cfg, prompt_tokens, prompt_positions, prompt_mask, vision)
  if tokens.ndim != 2 or positions.shape != tokens.shape:
    raise ValueError(f"tokens and positions must both be int[N, R]; got {tokens.shape} and "
                     f"{positions.shape}")
  if tokens.shape[0] % prompt_tokens.shape[0]:
    raise ValueError(f"continuation rows ({tokens.shape[0]}) must be a multiple of the "
                     f"prompts ({prompt_tokens.shape[0]}): N = B * samples per prompt")
  policy = Policy(cfg, constrain=constrain)
  prompt_mask = prompt_mask.astype(bool)
  prompt_hidden, prefix_kv = policy.apply(lora.variables(params), prompt_tokens, prompt_positions,
                                          prompt_mask, vision)
  cache = init_decode_cache(prefix_kv, tokens.shape[0] // prompt_tokens.shape[0], 0)
  hidden, _ = policy.apply(lora.variables(params), tokens, positions, prompt_mask, None, cache, 0)
  return prompt_hidden, hidden


def prefill(params: Params, cfg: ModelConfig, tokens, positions, token_mask, vision=None,
            constrain: Callable | None = None):
  """The prompt pass of the sampler: (hidden f32[B, P, D], per-layer (k, v) [B, K, P, Dh]).

  Same inputs as forward_hidden; the keys/values become the shared prefix of a cache
  (see init_decode_cache).
  """
  return Policy(cfg, constrain=constrain).apply(lora.variables(params), tokens, positions,
                                                token_mask.astype(bool), vision)


def init_decode_cache(prefix_kv, num_samples: int, num_slots: int):
  """A decode cache whose prefix is the prefill's keys, shared by `num_samples` rows each.

  prefix_kv: per-layer (k, v) [B, K, P, Dh] -> tuple of LayerCache with empty response
  slots [B*num_samples, K, num_slots, Dh]. Row b*G + j is sample j of prompt b. Scanned
  layers (one (k, v) with a leading layer axis [L, B, K, P, Dh]) keep that axis.
  """
  def layer_cache(k, v):
    *layer_axis, b, kv_heads, _, hd = k.shape
    empty = jnp.zeros((*layer_axis, b * num_samples, kv_heads, num_slots, hd), k.dtype)
    return LayerCache(prefix_k=k, prefix_v=v, k=empty, v=empty)
  return tuple(layer_cache(k, v) for k, v in prefix_kv)


def decode_step(params: Params, cfg: ModelConfig, tokens, positions, prefix_mask, cache,
                write_index, constrain: Callable | None = None):
  """Runs tokens int32[N, T] (usually T = 1) that belong at response slots write_index ..
  write_index+T-1, reading (not writing) the cache.

  positions: int32[N, T]; prefix_mask: bool[B, P] (the prompts' token mask, N = B*G);
  cache: tuple of LayerCache. Returns (hidden f32[N, T, D], per-layer new (k, v)
  [N, K, T, Dh]); store them with write_decode_cache(cache, new_kv, write_index).
  """
  if tokens.shape[0] % prefix_mask.shape[0]:
    raise ValueError(f"decode_step: tokens rows ({tokens.shape[0]}) must be a multiple of "
                     f"prefix_mask rows ({prefix_mask.shape[0]}): N = B * samples per prompt")
  return Policy(cfg, constrain=constrain).apply(
      lora.variables(params), tokens, positions, prefix_mask.astype(bool), None, cache,
      write_index)


def write_decode_cache(cache, new_kv, write_index):
  """The cache after a decode step: each layer's new keys/values [..., K, T, Dh] stored
  at response slots write_index .. write_index+T-1, or, where decode_step already wrote
  them (unscanned layers return the whole updated slots [..., K, R, Dh]), those slots
  as they are. Works with any leading axes (e.g. a stacked expert axis)."""
  def write(slots, new):
    if new.shape == slots.shape:  # already the updated slots (same values either way)
      return new
    return write_slots(slots, new, write_index)
  return tuple(c.replace(k=write(c.k, k), v=write(c.v, v)) for c, (k, v) in zip(cache, new_kv))


def cast_matmul_kernels(params: Params, cfg: ModelConfig) -> Params:
  """Params with every layer `kernel` already in the compute dtype (norms, biases,
  embeddings and the f32 lm_head stay as they are). Outputs are bit-identical, because
  Linear casts its kernel to that dtype anyway; the sampler calls this once before its
  loop so decode steps read compute-dtype weights instead of re-casting f32 ones."""
  dt = cfg.compute_dtype

  def cast(path, x):
    names = [getattr(k, "key", None) for k in path]
    return x.astype(dt) if names[-1] == "kernel" and "lm_head" not in names else x
  return jax.tree_util.tree_map_with_path(cast, params)


def lm_head(params: Params, cfg: ModelConfig):
  """The output projection f32[D, V]: the embedding transposed when tied."""
  params = lora.model_params(params)  # a LoRA branch: the base's (the head is not adapted)
  if cfg.tie_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


def logits_from_hidden(hidden, head):
  """hidden f32[..., D] @ head f32[D, V] -> logits f32[..., V], accumulated in f32."""
  return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)


def count_params(params: Params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
