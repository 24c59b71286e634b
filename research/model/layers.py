"""Building blocks of the Llama-style decoder: embedding, RMSNorm, RoPE, GQA attention, SwiGLU.

Shape suffixes: B batch, T query tokens, S key tokens, D model width, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head width, F MLP width, V vocabulary.

Every weight carries logical axis names (research/train/mesh.py maps them onto the device mesh).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
from flax import linen, nnx

from research.kernels import dispatch

Array = jax.Array


class Tokens(NamedTuple):
  """Per-token metadata that travels with hidden states through gathers.

  positions: RoPE position of each token within its document.
  segments: document id inside the packed row (0 = padding).
  indices: index of the token in its packed row; causality is decided on these, so a gathered
    subset of tokens still attends causally by its ORIGINAL order.
  """

  positions: Array  # [B, T] int32
  segments: Array  # [B, T] int32
  indices: Array  # [B, T] int32

  def take(self, idx_BK: Array) -> "Tokens":
    """The metadata of the tokens at row indices idx_BK (each row of idx sorted ascending)."""
    return Tokens(*(jnp.take_along_axis(a, idx_BK, axis=1) for a in self))


class KV(NamedTuple):
  """Keys and values an attention call can read besides its own tokens': k, v [B, S, K, Dh]
  (RoPE applied) and the metadata of each entry (`tok.segments` 0: an empty entry, never read).

  Two uses: KV sharing (MoR §3.2) keeps recursion 1's entries of a row for the later steps, and
  a decode cache keeps every past token's entries, each at its position (research/infer)."""

  k: Array
  v: Array
  tok: Tokens

  def write(self, new: "KV") -> "KV":
    """These entries with the new tokens' written at their indices (`new.tok.indices`, the
    entry positions); a new token with segment 0 (padding, or not routed here) writes nothing."""
    rows = jnp.arange(self.k.shape[0])[:, None]
    idx_BT, keep_BT = new.tok.indices, new.tok.segments != 0

    def put(old, val):
      keep = keep_BT.reshape(keep_BT.shape + (1,) * (old.ndim - 2))
      return old.at[rows, idx_BT].set(jnp.where(keep, val.astype(old.dtype), old[rows, idx_BT]))

    return KV(put(self.k, new.k), put(self.v, new.v),
              Tokens(*(put(a, b) for a, b in zip(self.tok, new.tok, strict=True))))

  def overlay(self, top: "KV") -> "KV":
    """`top`'s filled entries over these (same shapes): where top has an entry, it wins."""
    has_BS = top.tok.segments != 0
    pick = lambda a, b: jnp.where(has_BS.reshape(has_BS.shape + (1,) * (a.ndim - 2)), b, a)
    return KV(pick(self.k, top.k), pick(self.v, top.v),
              Tokens(*(pick(a, b) for a, b in zip(self.tok, top.tok, strict=True))))


def empty_kv(batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> KV:
  """A decode-cache site of `length` empty entries (entry s at index s)."""
  shape = (batch, length, kv_heads, head_dim)  # k and v separate buffers (a cache is donated)
  idx_BS = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return KV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
            Tokens(jnp.zeros_like(idx_BS), jnp.zeros_like(idx_BS), idx_BS))


class Site(NamedTuple):
  """Which stored keys/values one attention call writes and reads (static).

  name: the call's own entry in the carry's `kv` store. When the store holds it (a decode cache),
    the new tokens' K/V are written there and the call attends over it; otherwise the call is
    plain self-attention, its K/V stored under `name` only with `keep` (KV sharing's step 1).
  shared: read this entry (recursion 1's K/V of the same layer) instead of self-attending; the
    call then skips its K/V projections, unless `update` (share_update): the new tokens' fresh
    K/V are laid over the shared entries for this call (and kept in `name` when it is a cache).
  """

  name: str | None = None
  shared: str | None = None
  update: bool = False
  keep: bool = False


SELF_ATTENTION = Site()  # plain self-attention over the new tokens, nothing stored


class Carry(NamedTuple):
  """What flows through the model next to the hidden states, block to block (docs/architecture.md):
  `router`, the recurrent router's per-token state h_BTP (RMoE, routers.RecurrentRouter; None
  before the first MoE layer, read as h_0 = 0); `step`, the optimizer steps seen so far (ReXMoE's
  PSR schedule; None when no layer needs it); `kv`, the stored keys/values attention calls write
  and read by Site name (KV sharing in training, every site of a decode cache); `depth`, when
  decoding a MoR model, the recursion steps each cached token ran [B, S]. Dense and linear-router
  MoE layers pass `router` on unchanged."""

  router: Array | None = None
  step: Array | None = None
  kv: dict[str, KV] | None = None
  depth: Array | None = None


NO_CARRY = Carry()  # the carry entering the first block


def normal_init(std: float, names: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.normal(std), names)


# projection name -> (A [in, r], B [r, out]) of one depth, or (A, B, gate [B, r]) of a merged
# LoRA whose rank components are switched on per batch row (recursion.DepthLoRA.merged).
LoRA = dict[str, tuple[Array, ...]]


@jax.custom_vjp
def matmul(x_BTI: Array, w_IO: Array) -> Array:
  """y = x w over x's last axis (any leading axes); backward dx = g (w^T), dw = x^T g.

  On CPU, w^T is materialised (optimization_barrier) instead of being read transposed inside the
  dot: XLA:CPU's dot is slower on a transposed right operand, and the copy is only weight-sized
  (docs/benchmarks.md). GPU and TPU matmuls take transposed operands natively, so there the
  transpose is left to XLA to fuse.
  """
  return jax.lax.dot_general(x_BTI, w_IO, (((x_BTI.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x_BTI: Array, w_IO: Array) -> tuple[Array, tuple[Array, Array]]:
  return matmul(x_BTI, w_IO), (x_BTI, w_IO)


def _matmul_bwd(res: tuple[Array, Array], g_BTO: Array) -> tuple[Array, Array]:
  x_BTI, w_IO = res
  w_OI = w_IO.T
  if jax.default_backend() == "cpu":
    w_OI = jax.lax.optimization_barrier(w_OI)
  dx_BTI = jax.lax.dot_general(g_BTO, w_OI, (((g_BTO.ndim - 1,), (0,)), ((), ())))
  lead = tuple(range(x_BTI.ndim - 1))
  dw_IO = jax.lax.dot_general(x_BTI, g_BTO, ((lead, lead), ((), ())))
  return dx_BTI, dw_IO


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def linear_apply(linear: nnx.Linear, x_BTI: Array) -> Array:
  """linear(x) of a bias-free nnx.Linear, through `matmul`."""
  x, kernel_IO, _ = linear.promote_dtype((x_BTI, linear.kernel[...], None), dtype=linear.dtype)
  return matmul(x, kernel_IO)


def lora_delta(name: str, x_BTI: Array, lora: LoRA | None) -> Array | None:
  """((x A) * gate) B of the LoRA entry for `name` (RRT Eq. 3, scale 1), or None without one."""
  if lora is None or name not in lora:
    return None
  a_IR, b_RO, *gate = lora[name]
  h_BTR = x_BTI @ a_IR.astype(x_BTI.dtype)
  if gate:
    h_BTR = h_BTR * gate[0][:, None, :].astype(h_BTR.dtype)
  return h_BTR @ b_RO.astype(x_BTI.dtype)


def project(linear: nnx.Linear, name: str, x_BTI: Array, lora: LoRA | None) -> Array:
  """linear(x) + ((x A) * gate) B when `lora` has an entry for `name` (RRT Eq. 3, scale 1)."""
  y = linear_apply(linear, x_BTI)
  delta = lora_delta(name, x_BTI, lora)
  return y if delta is None else y + delta.astype(y.dtype)


def constrain_activations(x_BTD: Array) -> Array:
  """Pins hidden states to batch sharding; a no-op outside `nnx.logical_axis_rules`."""
  return linen.with_logical_constraint(x_BTD, ("batch", None, None))


class Embed(nnx.Module):
  """Token embedding E[V, D]; `attend` reuses it as the tied LM head (logits = x E^T)."""

  def __init__(self, vocab: int, d: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
    init = normal_init(std, ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (vocab, d), param_dtype))
    self.dtype = dtype

  def __call__(self, tokens_BT: Array) -> Array:
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: Array) -> Array:
    e_VD = self.embedding[...].astype(self.dtype)
    return jnp.einsum("btd,vd->btv", x_BTD, e_VD, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 (Zhang & Sennrich 2019)."""

  def __init__(self, d: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    init = nnx.with_partitioning(nnx.initializers.ones, ("norm",))
    self.scale = nnx.Param(init(jax.random.key(0), (d,), param_dtype))
    self.eps = eps

  def __call__(self, x_BTD: Array, scale: Array | None = None) -> Array:
    """`scale` [D] (or [B, D], one per row) overrides the stored scale (untied per-depth norms
    of a recursive core)."""
    x32 = x_BTD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...] if scale is None else scale
    scale = scale.astype(jnp.float32)
    shape = (x_BTD.shape[0], 1, -1) if scale.ndim == 2 else (1,) * (x_BTD.ndim - 1) + (-1,)
    scale = scale.reshape(shape)
    return (y * scale).astype(x_BTD.dtype)


def apply_rope(x_BTND: Array, positions_BT: Array, theta: float) -> Array:
  """Rotary embedding in the rotate-half layout of HF Llama, at explicit positions."""
  half = x_BTND.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  cos, sin = jnp.cos(angle_BTF)[:, :, None], jnp.sin(angle_BTF)[:, :, None]
  x1, x2 = jnp.split(x_BTND.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTND.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE at explicit positions and a segment-aware causal mask.

  Self-attention over `tok`, whose indices ascend along each row (packed rows, and the sorted
  token subsets of MoR), or over stored keys and values (Site). Both go through the one kernel
  dispatch (research/kernels/dispatch.py, `model.attention_impl`): XLA runs self-attention
  block-causal and stored K/V masked; the Pallas routed-attention kernel skips masked blocks
  from the data.
  """

  def __init__(self, cfg: mlc.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, dh = cfg.d_model, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, dh
    self.rope_theta = cfg.rope_theta
    self.cross_segments = cfg.attend_across_segments
    self.attention_impl = cfg.attention_impl

    def linear(din, dout, names):
      return nnx.Linear(din, dout, use_bias=False, kernel_init=normal_init(cfg.init_std, names),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.q_proj = linear(d, cfg.num_heads * dh, ("embed", "heads"))
    self.k_proj = linear(d, cfg.num_kv_heads * dh, ("embed", "kv_heads"))
    self.v_proj = linear(d, cfg.num_kv_heads * dh, ("embed", "kv_heads"))
    self.o_proj = linear(cfg.num_heads * dh, d, ("heads", "embed"))

  def __call__(self, x_BTD: Array, tok: Tokens, lora: LoRA | None = None) -> Array:
    """Self-attention over `tok` (`forward` without stored keys and values)."""
    return self.forward(x_BTD, tok, lora)[0]

  def forward(self, x_BTD: Array, tok: Tokens, lora: LoRA | None = None,
              site: Site = SELF_ATTENTION, kv: dict[str, KV] | None = None,
              decoding: bool = False) -> tuple[Array, dict[str, KV]]:
    """(output, the kv store after this call): self-attention over `tok`, or over stored keys and
    values as `site` says (Site). `decoding`: the store is a decode cache (research/infer)."""
    b, t, _ = x_BTD.shape
    heads, kv_heads, dh = self.num_heads, self.num_kv_heads, self.head_dim
    kv = {} if kv is None else kv
    q = apply_rope(project(self.q_proj, "q_proj", x_BTD, lora).reshape(b, t, heads, dh),
                   tok.positions, self.rope_theta)
    if site.shared is not None and not site.update:  # read recursion 1's K/V: no projections
      read = kv[site.shared]
    else:
      k = apply_rope(project(self.k_proj, "k_proj", x_BTD, lora).reshape(b, t, kv_heads, dh),
                     tok.positions, self.rope_theta)
      v = project(self.v_proj, "v_proj", x_BTD, lora).reshape(b, t, kv_heads, dh)
      own = KV(k, v, tok)
      read = None  # None: self-attention over the new tokens
      if site.name in kv:  # a decode cache: write, then read the whole site
        kv = {**kv, site.name: kv[site.name].write(own)}
        read = kv[site.name]
      elif site.keep:
        kv = {**kv, site.name: own}
      if site.shared is not None:  # share_update: the fresh K/V over recursion 1's
        base = kv[site.shared]
        read = base.write(own) if read is None else base.overlay(read)
    attend = dispatch.attention_fn(self.attention_impl)
    if read is None:
      out_BTHD = attend(q, k, v, tok.indices, tok.segments, tok.indices, tok.segments, causal=True,
                        cross_segments=self.cross_segments, sorted_self_attention=True)
    else:
      # KV sharing in training / prefill reads recursion 1's entries: every token of the row in
      # index order (KV sharing needs c_1 = 1), and the queries are a gathered subset whose slots
      # have distinct ascending indices (routing.select_topk) or the whole row in place.
      row_keys = site.shared is not None and not site.update and not decoding
      out_BTHD = attend(q, read.k, read.v, tok.indices, tok.segments, read.tok.indices,
                        read.tok.segments, causal=True, cross_segments=self.cross_segments,
                        sorted_queries_row_keys=row_keys)
    return project(self.o_proj, "o_proj", out_BTHD.reshape(b, t, heads * dh), lora), kv


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer 2020), no biases."""

  def __init__(self, d: int, f: int, *, std: float, dtype, param_dtype, rngs: nnx.Rngs):
    def linear(din, dout, names):
      return nnx.Linear(din, dout, use_bias=False, kernel_init=normal_init(std, names),
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.gate_proj = linear(d, f, ("embed", "mlp"))
    self.up_proj = linear(d, f, ("embed", "mlp"))
    self.down_proj = linear(f, d, ("mlp", "embed"))

  def __call__(self, x_BTD: Array, lora: LoRA | None = None) -> Array:
    h = (jax.nn.silu(project(self.gate_proj, "gate_proj", x_BTD, lora))
         * project(self.up_proj, "up_proj", x_BTD, lora))
    return project(self.down_proj, "down_proj", h, lora)


class Block(nnx.Module):
  """Pre-norm decoder layer: h += attn(norm(h)); h += ffn(norm(h)).

  The FFN slot holds the dense SwiGLU (default) or a routed FFN passed as `ffn` (moe.MoE), called
  as ffn.forward(x, valid_BT, carry) -> (y, aux, carry) with valid_BT False at padding; the block
  adds y to its input only if `ffn.outer_residual` (False for Chain-of-Experts' "inner" wiring,
  whose output is norm(h) + the updates: docs/moe.md).
  """

  def __init__(self, cfg: mlc.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs,
               ffn: nnx.Module | None = None):
    norm = dict(eps=cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.d_model, **norm)
    self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, **norm)
    self.ffn = ffn or SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BTD: Array, tok: Tokens, lora: LoRA | None = None,
               norms: tuple[Array, Array] | None = None) -> Array:
    """The block's output without its aux (`forward`)."""
    return self.forward(x_BTD, tok, lora, norms)[0]

  def forward(self, x_BTD: Array, tok: Tokens, lora: LoRA | None = None,
              norms: tuple[Array, Array] | None = None, *, site: Site = SELF_ATTENTION,
              carry: Carry = NO_CARRY) -> tuple[Array, dict, Carry]:
    """(output, aux of a routed FFN or {}, carry). `lora`: this depth's LoRA pairs; `norms`: this
    depth's (attn, ffn) norm scales; `site`: the stored K/V its attention writes and reads
    (Site; by default plain self-attention); `carry`: from the previous block (Carry)."""
    attn_scale, ffn_scale = (None, None) if norms is None else norms
    y_BTD, kv = self.attn.forward(self.attn_norm(x_BTD, attn_scale), tok, lora, site, carry.kv,
                                  decoding=carry.depth is not None)
    carry = carry._replace(kv=kv or carry.kv)
    x_BTD = x_BTD + y_BTD
    h_BTD = self.ffn_norm(x_BTD, ffn_scale)
    if isinstance(self.ffn, SwiGLU):
      return constrain_activations(x_BTD + self.ffn(h_BTD, lora)), {}, carry
    y_BTD, aux, carry = self.ffn.forward(h_BTD, tok.segments != 0, carry)
    return constrain_activations(x_BTD + y_BTD if self.ffn.outer_residual else y_BTD), aux, carry
