"""Qwen3-VL in JAX: vision tower (images + video), multimodal RoPE, DeepStack.

    cfg, params = qwen3_vl_import.load_qwen3_vl("/path/to/Qwen3-VL-4B-Instruct")  # streams
    logits = forward(params, cfg, input_ids, attention_mask,
                     pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

Architecture (learned from transformers' Qwen3VLForConditionalGeneration; our own code):

Vision tower -- all patches of all images (or all videos) of a call form ONE sequence
  `pixel_values: f32[N, C*Tp*P*P]`, ordered per image/video as the processor emits them
  (time, merge-block row, merge-block column, row in block, column in block):
  1. patch embedding: a Conv3d with kernel = stride = (Tp, P, P) is a linear map of the
     flattened patch (`patch_embed/kernel [C*Tp*P*P, W]` = conv weight reshaped, transposed);
  2. learned position embeddings `[S*S, W]` bilinearly resampled (align-corners) to each
     grid's (h, w), added to the patch embeddings;
  3. `depth` pre-LayerNorm ViT blocks with 2-D rotary embeddings (row and column angles,
     half the rotary pairs each); attention is restricted to each frame of each image/video
     (HF's cu_seqlens; a block-diagonal mask from segment ids here);
  4. the merger: LayerNorm per patch, then each group of merge^2 consecutive patches (one
     merge block) is concatenated and mapped by a GELU MLP to ONE LM token;
  5. DeepStack: after the blocks listed in `deepstack_visual_indexes`, a merger whose
     LayerNorm acts on the concatenated merge^2 patches ("post-shuffle norm") makes extra
     LM-width features; the k-th is ADDED to the LM hidden states at the visual token
     positions right after decoder layer k.

Language model -- a Qwen3 decoder (same parameter names as copd_jax.models.decoder) whose rotary
  angles come from 3-D position ids (t, h, w) interleaved along the frequency axis: pair j
  uses the h position if j % 3 == 1 and j < 3*mrope_section[1], the w position if
  j % 3 == 2 and j < 3*mrope_section[2], else the t position. Text tokens have t = h = w.
  Image/video pad tokens are replaced in order by the merged vision embeddings.
  `get_rope_index` (host, numpy) computes the 3-D positions exactly as HF does.

Video: each temporal patch of a video (Tp frames) is its own group of pad tokens in the
  prompt, preceded by a "<t seconds>" timestamp and <|vision_start|> (see
  copd_jax.data.vision_preprocess.video_placeholder_text); its positions are those of a one-
  frame image, the time being carried by the timestamp text.

Parameters (f32; `kernel` = HF `weight` transposed):
    embed_tokens/embedding, layers_{i}/..., norm/scale, lm_head/kernel  (as copd_jax.models.decoder)
    visual/patch_embed/{kernel,bias}          <- model.visual.patch_embed.proj.{weight,bias}
    visual/pos_embed [S*S, W]                 <- model.visual.pos_embed.weight
    visual/blocks_{i}/{norm1,norm2}/{scale,bias}  <- ...blocks.{i}.{norm1,norm2}.{weight,bias}
    visual/blocks_{i}/attn/{qkv,proj}/{kernel,bias}, .../mlp/{linear_fc1,linear_fc2}/...
    visual/merger/{norm,linear_fc1,linear_fc2}
    visual/deepstack_merger_list_{k}/{norm,linear_fc1,linear_fc2}
Numerics as copd_jax.models.decoder: matmul inputs in `cfg.text.dtype`, f32 accumulation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from copd_jax.models import decoder, layers, lora, partitioning
from copd_jax.models.layers import mrope_angles, rotate_with_angles
from copd_jax.models.qwen3_vl_config import (
  _VISION_ACTS,
  Grid,
  Qwen3VLConfig,
  VisionTowerConfig,
  _check_grids,
  grids_to_tuple,
)

Params = Any


_MASKED_SCORE = -1e30


def _bilinear_taps(pos, n: int, side: int):
  """align_corners bilinear along one axis: target i of n -> source i * (side-1) / (n-1),
  in f32 as HF. Returns (lower tap, upper tap, weight of the upper tap)."""
  src = pos.astype(np.float32) * np.float32(side - 1) / np.float32(max(n - 1, 1))
  lo = np.floor(src)
  frac = (src - lo).astype(np.float32)
  lo = lo.astype(np.int64)
  return lo, np.minimum(lo + 1, side - 1), frac


@functools.lru_cache(maxsize=64)
def vision_layout(grids: tuple[Grid, ...], vcfg: VisionTowerConfig):
  """Static per-patch tables for a tuple of (t, h, w) grids, in processor patch order.

  Returns numpy arrays (N = sum t*h*w):
    interp_index int32[N, 4], interp_weight f32[N, 4]: bilinear taps into pos_embed
    rotary_rc int32[N, 2]: (row, column) of each patch for the 2-D rotary embedding
    segment int32[N]: attention segment (one per frame of each image/video)
  """
  m, side = vcfg.spatial_merge_size, vcfg.grid_per_side
  index, weight, rc, segment = [], [], [], []
  seg = 0
  for t, h, w in grids:
    # Patch order within a frame: (block row, block col, row in block, col in block).
    br, bc, ir, ic = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m),
                                 np.arange(m), indexing="ij")
    row, col = (br * m + ir).reshape(-1), (bc * m + ic).reshape(-1)
    r0, r1, dr = _bilinear_taps(row, h, side)
    c0, c1, dc = _bilinear_taps(col, w, side)
    taps = np.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], -1)
    one = np.float32(1)
    weights = np.stack([(one - dr) * (one - dc), (one - dr) * dc, dr * (one - dc), dr * dc], -1)
    for _ in range(t):
      index.append(taps)
      weight.append(weights)
      rc.append(np.stack([row, col], -1))
      segment.append(np.full(h * w, seg))
      seg += 1
  return (np.concatenate(index).astype(np.int32), np.concatenate(weight).astype(np.float32),
          np.concatenate(rc).astype(np.int32), np.concatenate(segment).astype(np.int32))


def get_rope_index(cfg: Qwen3VLConfig, input_ids, attention_mask=None, image_grid_thw=None,
                   video_grid_thw=None):
  """3-D rotary positions, as HF Qwen3VLModel.get_rope_index (host, numpy).

  input_ids: int[B, T]; attention_mask: int/bool[B, T] or None (1 = real token);
  image_grid_thw, video_grid_thw: int[N, 3] or None (in prompt order across the batch).
  Returns (position_ids int64[3, B, T], rope_deltas int64[B, 1]); padded positions get 0.
  Each run of consecutive image (video) pad tokens takes the next image grid (the next
  temporal patch of the next video): positions start + (0, row, col); text continues at
  start + max(h, w) / merge.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be int[B, T], got shape {ids.shape}")
  mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask) != 0
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  m = cfg.vision.spatial_merge_size
  images = list(grids_to_tuple(image_grid_thw, "image_grid_thw"))
  # Video: one group of pad tokens per temporal patch, each positioned like a t=1 image.
  videos = [(1, h, w) for t, h, w in grids_to_tuple(video_grid_thw, "video_grid_thw")
            for _ in range(t)]
  queues = {1: iter(images), 2: iter(videos)}
  position_ids = np.zeros((3,) + ids.shape, np.int64)
  deltas = np.zeros((ids.shape[0], 1), np.int64)
  for b in range(ids.shape[0]):
    row = ids[b][mask[b]]
    kinds = np.where(row == cfg.image_token_id, 1, np.where(row == cfg.video_token_id, 2, 0))
    pieces, pos, start = [], 0, 0
    while start < len(row):
      end = start
      while end < len(row) and kinds[end] == kinds[start]:
        end += 1
      kind = int(kinds[start])
      if kind == 0:
        pieces.append(np.broadcast_to(np.arange(end - start) + pos, (3, end - start)))
        pos += end - start
      else:
        what = "image_grid_thw" if kind == 1 else "video_grid_thw (one entry per frame group)"
        grid = next(queues[kind], None)
        if grid is None:
          raise ValueError(f"row {b}: more runs of {'image' if kind == 1 else 'video'} pad "
                           f"tokens than entries in {what}")
        t, h, w = grid[0], grid[1] // m, grid[2] // m
        if end - start != t * h * w:
          raise ValueError(f"row {b}: a run of {end - start} "
                           f"{'image' if kind == 1 else 'video'} pad tokens at column "
                           f"{start} but its grid {grid} needs {t * h * w}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        pieces.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos)
        pos += max(grid[1], grid[2]) // m
      start = end
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    position_ids[:, b, mask[b]] = positions
    deltas[b, 0] = (positions.max() + 1 if positions.size else 0) - len(ids[b])
  return position_ids, deltas


class VisionAttention(nn.Module):
  """Multi-head self-attention over patches, restricted to each segment, 2-D rotary.
  x: f32[..., N, W] (any leading batch axes); same_segment: bool[..., N, N]."""
  vcfg: VisionTowerConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, angles, same_segment):
    vcfg, dt = self.vcfg, self.dtype
    *lead, n, w = x.shape
    heads, hd = vcfg.num_heads, vcfg.head_dim
    f32 = dict(preferred_element_type=jnp.float32)
    qkv = layers.Linear(3 * w, dt, use_bias=True, axes=("vision_embed", "vision_heads"),
                        name="qkv")(x).reshape(*lead, n, 3, heads, hd)
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    q = (rotate_with_angles(q, angles) * hd ** -0.5).astype(dt)
    k = rotate_with_angles(k, angles).astype(dt)
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k, **f32)
    probs = jax.nn.softmax(jnp.where(same_segment[..., None, :, :], scores, _MASKED_SCORE),
                           axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", probs.astype(dt), v.astype(dt), **f32)
    return layers.Linear(w, dt, use_bias=True, axes=("vision_heads", "vision_embed"),
                         name="proj")(out.reshape(*lead, n, w))


class VisionMLP(nn.Module):
  vcfg: VisionTowerConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    vcfg = self.vcfg
    h = layers.Linear(vcfg.intermediate_size, self.dtype, use_bias=True,
                      axes=("vision_embed", "vision_mlp"), name="linear_fc1")(x)
    h = jax.nn.gelu(h, approximate=_VISION_ACTS[vcfg.hidden_act])
    return layers.Linear(vcfg.hidden_size, self.dtype, use_bias=True,
                         axes=("vision_mlp", "vision_embed"), name="linear_fc2")(h)


class VisionBlock(nn.Module):
  """Pre-LayerNorm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  vcfg: VisionTowerConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, angles, same_segment):
    vcfg = self.vcfg
    h = layers.layer_norm(vcfg.layer_norm_eps, "norm1")(x)
    x = x + VisionAttention(vcfg, self.dtype, name="attn")(h, angles, same_segment)
    h = layers.layer_norm(vcfg.layer_norm_eps, "norm2")(x)
    return x + VisionMLP(vcfg, self.dtype, name="mlp")(h)


class PatchMerger(nn.Module):
  """merge^2 consecutive patches -> one LM-width token: LayerNorm, concat, fc1, GELU, fc2.

  `postshuffle_norm` (the DeepStack mergers) normalises the concatenated merge^2 patches;
  the final merger normalises each patch before concatenating.
  """
  vcfg: VisionTowerConfig
  dtype: Any
  postshuffle_norm: bool

  @nn.compact
  def __call__(self, x):
    vcfg = self.vcfg
    merged = vcfg.hidden_size * vcfg.merge_unit
    grouped = x.shape[:-2] + (-1, merged)  # [..., N / merge^2, merge^2 * W]
    norm = layers.layer_norm(vcfg.layer_norm_eps, "norm")
    x = norm(x.reshape(grouped)) if self.postshuffle_norm else norm(x).reshape(grouped)
    x = layers.Linear(merged, self.dtype, use_bias=True, axes=("vision_embed", "vision_mlp"),
                      name="linear_fc1")(x)
    return layers.Linear(vcfg.out_hidden_size, self.dtype, use_bias=True,
                         axes=("vision_mlp", "embed"),
                         name="linear_fc2")(jax.nn.gelu(x, approximate=False))


class VisionTower(nn.Module):
  """pixel patches f32[..., N, patch_dim] -> (tokens f32[..., N/merge^2, D], DeepStack
  features tuple of f32[..., N/merge^2, D], one per deepstack_visual_indexes entry).

  The patch layout comes from static `grids` (vision_layout), or, for batches of prompts
  padded to a fixed vision budget, as arrays `layout` = (interp_index int32[..., N, 4],
  interp_weight f32[..., N, 4], rotary_rc int32[..., N, 2], segment int32[..., N]) with
  the patches' leading axes (see qwen3_vl_decode.prompt_media). Attention never crosses a
  segment (one frame of one image or video), nor a leading batch index."""
  vcfg: VisionTowerConfig
  dtype: Any
  # Rematerialise each block in the backward pass (the decoder's ModelConfig.remat): only
  # block inputs are kept, not each block's [N, N] attention probabilities and MLP width.
  remat: bool = False

  @nn.compact
  def __call__(self, patches, grids: tuple[Grid, ...] = (), layout=None):
    vcfg = self.vcfg
    if layout is None:
      layout = tuple(jnp.asarray(x) for x in vision_layout(grids, vcfg))
    interp_index, interp_weight, rotary_rc, segment = layout
    x = layers.Linear(vcfg.hidden_size, self.dtype, use_bias=True,
                      axes=("vision_patch", "vision_embed"), name="patch_embed")(
        patches.astype(jnp.float32))
    pos_table = self.param("pos_embed", layers.with_axes(nn.initializers.normal(0.02),
                                                         ("vision_positions", "vision_embed")),
                           (vcfg.num_position_embeddings, vcfg.hidden_size), jnp.float32)
    pos = jnp.einsum("...kw,...k->...w", pos_table[interp_index], interp_weight)
    x = x + pos
    # Row and column angles each use head_dim/4 frequencies of the head_dim/2 rotary pairs.
    quarter = vcfg.head_dim // 4
    inv_freq = 1.0 / (vcfg.rope_theta ** (np.arange(quarter, dtype=np.float32) * 2
                                          / (vcfg.head_dim // 2)))
    angles = (rotary_rc[..., None].astype(jnp.float32) * inv_freq).reshape(
        rotary_rc.shape[:-1] + (2 * quarter,))
    same_segment = segment[..., :, None] == segment[..., None, :]
    deepstack = []  # in block order, as HF (the k-th is injected after decoder layer k)
    block = nn.remat(VisionBlock) if self.remat else VisionBlock
    for i in range(vcfg.depth):
      x = block(vcfg, self.dtype, name=f"blocks_{i}")(x, angles, same_segment)
      if i in vcfg.deepstack_visual_indexes:
        k = vcfg.deepstack_visual_indexes.index(i)
        deepstack.append(PatchMerger(vcfg, self.dtype, True,
                                     name=f"deepstack_merger_list_{k}")(x))
    return PatchMerger(vcfg, self.dtype, False, name="merger")(x), tuple(deepstack)


def _scatter_in_order(embeds, is_slot, values):
  """Puts values[k] at the k-th True of is_slot (row-major over [B, T]); others unchanged.

  embeds: f32[B, T, D]; is_slot: bool[B, T]; values: f32[N, D] with N = is_slot.sum().
  """
  order = jnp.cumsum(is_slot.reshape(-1)).reshape(is_slot.shape) - 1
  gathered = values[jnp.clip(order, 0, values.shape[0] - 1)]
  return jnp.where(is_slot[..., None], gathered.astype(embeds.dtype), embeds)


def _add_in_order(hidden, is_slot, values):
  order = jnp.cumsum(is_slot.reshape(-1)).reshape(is_slot.shape) - 1
  gathered = values[jnp.clip(order, 0, values.shape[0] - 1)]
  return hidden + jnp.where(is_slot[..., None], gathered.astype(hidden.dtype), 0.0)


def _after_layer_only(i, per_layer, apply, x):
  """apply(per_layer[i]) when decoder layer i has an entry (i < len(per_layer)), else x.

  i: a Python int (unrolled layers) or a traced int32 scalar (the layers under nn.scan,
  where every layer runs the same body: the entry is picked by a dynamic index and the
  result selected, so layers past the last entry add nothing)."""
  if not per_layer:
    return x
  if isinstance(i, int):
    return apply(per_layer[i]) if i < len(per_layer) else x
  last = len(per_layer) - 1
  entry = jax.lax.dynamic_index_in_dim(jnp.stack(per_layer), jnp.minimum(i, last),
                                       keepdims=False)
  return jnp.where(i <= last, apply(entry), x)


class Qwen3VL(decoder.Decoder):
  """The shared Qwen3 decoder (cfg: the text config) with the Qwen3-VL vision tower:
  vision tokens replace the image / video pad tokens, rotary angles come from 3-D
  (t, h, w) positions, and DeepStack features are added to the vision tokens' hidden
  states right after the first decoder layers. Returns (final-normed hidden f32[B, T, D],
  per-layer (k, v) [B, K, T, Dh]) -- a prompt's keys become a decode cache's prefix
  (decode_tokens continues from it, as the text policy's decode step does).
  """
  vl: Qwen3VLConfig | None = None
  embedding_std: float | None = 0.02

  def setup(self):
    super().setup()
    self.visual = VisionTower(self.vl.vision, self.cfg.compute_dtype, remat=self.cfg.remat,
                              name="visual")

  def __call__(self, input_ids, attention_mask, position_ids, pixel_values, image_grids,
               pixel_values_videos, video_grids):
    vl, text = self.vl, self.cfg
    x = self.embed(input_ids)
    injections = []  # (is_slot bool[B, T], deepstack features per layer)
    for patches, grids, token_id in ((pixel_values, image_grids, vl.image_token_id),
                                     (pixel_values_videos, video_grids, vl.video_token_id)):
      if patches is None:
        continue
      tokens, deepstack = self.visual(patches, grids)
      is_slot = input_ids == token_id
      x = _scatter_in_order(x, is_slot, tokens)
      injections.append((is_slot, deepstack))

    def add_deepstack(i, hidden):  # DeepStack: right after decoder layer i
      for is_slot, deepstack in injections:
        hidden = _after_layer_only(
            i, deepstack, lambda feats, h=hidden, s=is_slot: _add_in_order(h, s, feats), hidden)
      return hidden
    angles = mrope_angles(position_ids, text.head_dim, text.rope_theta, vl.mrope_section)
    return self.decode(x, angles, attention_mask.astype(bool), after_layer=add_deepstack)

  def forward_prompts(self, input_ids, attention_mask, media):
    """Prompts whose media are padded to a fixed vision budget (qwen3_vl_decode.PromptMedia,
    leading axis B like input_ids int32[B, P]): the tower runs on each prompt's own
    patches, and its k-th image (video) token fills the prompt's k-th image (video) pad
    token. Returns what __call__ returns."""
    vl, text = self.vl, self.cfg
    x = self.embed(input_ids)
    tokens, deepstack = self.visual(media.patches, layout=media.layout)  # [B, M, D]
    # The sharded tower's outputs pinned to the residual stream's rows (decoder.Policy).
    tokens = self.constrain_activations(tokens)
    deepstack = tuple(self.constrain_activations(d) for d in deepstack)
    is_image, is_video = input_ids == vl.image_token_id, input_ids == vl.video_token_id
    # Which of the prompt's vision tokens each position takes (-1: none): images first,
    # then the videos, in prompt order (as prompt_media lays the patches out).
    slot = jnp.where(is_image, jnp.cumsum(is_image, axis=1) - 1,
                     jnp.where(is_video, jnp.cumsum(is_video, axis=1) - 1
                               + media.image_tokens[:, None], -1))
    take = lambda values: jnp.take_along_axis(  # noqa: E731 [B, M, D] -> [B, P, D]
        values, jnp.clip(slot, 0, values.shape[1] - 1)[..., None], axis=1)
    is_slot = (slot >= 0)[..., None]
    x = jnp.where(is_slot, take(tokens).astype(x.dtype), x)

    def add_deepstack(i, hidden):
      return _after_layer_only(
          i, deepstack,
          lambda feats: hidden + jnp.where(is_slot, take(feats).astype(hidden.dtype), 0.0),
          hidden)
    angles = mrope_angles(jnp.moveaxis(media.position_ids, -2, 0), text.head_dim,
                          text.rope_theta, vl.mrope_section)
    return self.decode(x, angles, attention_mask.astype(bool), after_layer=add_deepstack)

  def decode_tokens(self, tokens, positions, prefix_mask, cache, write_index):
    """Generated (text) tokens int32[N, T] after a prefilled prompt: their positions
    int32[N, T] are 1-D (t = h = w for text), continuing after the prompt's largest
    position; the cache and masks as in Decoder.decode."""
    text = self.cfg
    angles = mrope_angles(jnp.broadcast_to(positions[None], (3,) + positions.shape),
                          text.head_dim, text.rope_theta, self.vl.mrope_section)
    return self.decode(self.embed(tokens), angles, prefix_mask, cache, write_index)

  def init_all(self, *args):
    hidden, _ = self(*args)
    if not self.cfg.tie_embeddings:
      self.lm_head(hidden)
    return hidden


def _module(cfg: Qwen3VLConfig, constrain: Callable | None = None) -> Qwen3VL:
  """The module of cfg; constrain: the residual stream's constraint (Decoder.constrain)."""
  return Qwen3VL(cfg.text, vl=cfg, constrain=constrain)


def _boxed_params(cfg: Qwen3VLConfig, key):
  """The init's parameters with their partitioning metadata (nn.LogicallyPartitioned)."""
  m2 = cfg.vision.merge_unit
  m = cfg.vision.spatial_merge_size
  ids = jnp.full((1, 1), cfg.image_token_id, jnp.int32)
  args = (ids, jnp.ones((1, 1), jnp.int32), jnp.zeros((3, 1, 1), jnp.int32),
          jnp.zeros((m2, cfg.vision.patch_dim), jnp.float32), ((1, m, m),), None, ())
  return _module(cfg).init(key, *args, method=Qwen3VL.init_all)["params"]


def init_params(cfg: Qwen3VLConfig, key) -> Params:
  """Fresh random f32 parameters (for shapes and tests; not HF's initialisation): plain
  arrays, the partitioning metadata unboxed."""
  return jax.jit(lambda k: partitioning.unbox(_boxed_params(cfg, k)))(key)


@functools.lru_cache(maxsize=16)
def param_axes(cfg: Qwen3VLConfig) -> dict[tuple[str, ...], tuple[str | None, ...]]:
  """{parameter path: the logical axes its layer declares} (vision tower included), from
  an abstract init; see decoder.param_axes."""
  boxed = jax.eval_shape(lambda k: _boxed_params(cfg, k), jax.random.key(0))
  return partitioning.declared_axes(boxed)


# Layer / block counts beyond this are not a model (the largest released ones have ~100):
# tracing even an abstract init of 10**8 layers would run for hours.
MAX_LAYERS = 4096


def param_shapes(cfg: Qwen3VLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{parameter path: shape} without allocating anything. A checkpoint's layer counts are
  checked against its headers first (check_layer_counts); MAX_LAYERS bounds any caller."""
  for name, count in (("text_config.num_hidden_layers", cfg.text.num_layers),
                      ("vision_config.depth", cfg.vision.depth)):
    if count > MAX_LAYERS:
      raise ValueError(f"{name}={count} is more than {MAX_LAYERS} layers")
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def lm_head(params: Params, cfg: Qwen3VLConfig):
  """f32[D, V]: the embedding transposed when tied."""
  params = lora.model_params(params)  # a LoRA branch: the base's (the head is not adapted)
  if cfg.text.tie_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]


@functools.partial(jax.jit, static_argnames=("cfg", "image_grids", "video_grids", "constrain"))
def forward_hidden(params: Params, cfg: Qwen3VLConfig, input_ids, attention_mask, position_ids,
                   pixel_values=None, image_grids: tuple[Grid, ...] = (),
                   pixel_values_videos=None, video_grids: tuple[Grid, ...] = (),
                   constrain: Callable | None = None):
  """Jitted core: final-normed hidden f32[B, T, D].

  input_ids, attention_mask: int[B, T]; position_ids: int[3, B, T] (get_rope_index);
  pixel_values: f32[N_img, patch_dim] with static image_grids (tuple of (t, h, w));
  pixel_values_videos: f32[N_vid, patch_dim] with static video_grids.
  """
  hidden, _ = _module(cfg, constrain).apply(
      lora.variables(params), input_ids, attention_mask, position_ids, pixel_values,
      image_grids, pixel_values_videos, video_grids)
  return hidden


def check_inputs(cfg: Qwen3VLConfig, input_ids, attention_mask, pixel_values, image_grids,
                 pixel_values_videos, video_grids) -> None:
  """Host-side checks with errors naming the argument (before anything is compiled)."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"input_ids must be int[B, T], got {ids.dtype}{ids.shape}")
  if np.asarray(attention_mask).shape != ids.shape:
    raise ValueError(f"attention_mask must have shape {ids.shape}, got "
                     f"{np.asarray(attention_mask).shape}")
  m2 = cfg.vision.merge_unit
  for name, patches, grids, token_id, grid_name in (
      ("pixel_values", pixel_values, image_grids, cfg.image_token_id, "image_grid_thw"),
      ("pixel_values_videos", pixel_values_videos, video_grids, cfg.video_token_id,
       "video_grid_thw")):
    n_slots = int((ids == token_id).sum())
    if patches is None:
      if grids:
        raise ValueError(f"{grid_name} was given without {name}")
      if n_slots:
        raise ValueError(f"input_ids hold {n_slots} pad tokens (id {token_id}) but {name} "
                         "is None")
      continue
    if not grids:
      raise ValueError(f"{name} was given without {grid_name}")
    _check_grids(grids, cfg.vision, grid_name)
    want = (sum(t * h * w for t, h, w in grids), cfg.vision.patch_dim)
    if tuple(np.shape(patches)) != want:
      raise ValueError(f"{name} must be f32[sum(t*h*w), C*Tp*P*P] = {want} for {grid_name}="
                       f"{list(grids)}, got {tuple(np.shape(patches))}")
    if n_slots != want[0] // m2:
      raise ValueError(f"input_ids hold {n_slots} pad tokens (id {token_id}) but {grid_name}="
                       f"{list(grids)} makes {want[0] // m2} vision tokens")


def forward(params: Params, cfg: Qwen3VLConfig, input_ids, attention_mask=None,
            pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
            video_grid_thw=None):
  """Logits f32[B, T, V] for a Qwen3-VL prompt batch (HF Qwen3VLForConditionalGeneration).

  input_ids: int[B, T] with image/video pad tokens laid out as the HF processor does;
  attention_mask: int[B, T] (1 = token, 0 = padding) or None; pixel_values /
  pixel_values_videos: f32[N, C*Tp*P*P] from copd_jax.data.vision_preprocess; *_grid_thw:
  int[n, 3]. Positions are computed on the host (get_rope_index), then one jitted call per
  distinct set of grid shapes.
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  image_grids = grids_to_tuple(image_grid_thw, "image_grid_thw")
  video_grids = grids_to_tuple(video_grid_thw, "video_grid_thw")
  check_inputs(cfg, ids, mask, pixel_values, image_grids, pixel_values_videos, video_grids)
  position_ids, _ = get_rope_index(cfg, ids, mask, image_grid_thw, video_grid_thw)
  hidden = forward_hidden(
      params, cfg, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
      jnp.asarray(position_ids, jnp.int32),
      None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32), image_grids,
      None if pixel_values_videos is None else jnp.asarray(pixel_values_videos, jnp.float32),
      video_grids)
  return decoder.logits_from_hidden(hidden, lm_head(params, cfg))
