"""SkyReels-V2 networks: the video DiT and the CLIP vision tower of the image-to-video checkpoints.

One DiT class serves every checkpoint; the variants are switches in its config.json:
  T2V    one timestep per sample, text cross-attention;
  I2V    36 input channels (noise + mask + image latents), CLIP image tokens as extra cross-attention keys/values;
         first-last-frame checkpoints add a learned position table for the two images' tokens;
  DF     diffusion forcing: a timestep per latent frame, fps conditioning, optionally block-causal self-attention.
Parameter names are the checkpoints' keys (diffusers' transformer/, transformers' CLIPVisionModelWithProjection), so a
state dict loads strictly. Modules are built on the meta device and filled from it, so nothing registers buffers.
"""
import dataclasses
import functools
import math
from itertools import accumulate

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


gelu_tanh = functools.partial(F.gelu, approximate="tanh")


def fields_from(cls, config):  # from a config.json dict; keys not in cls (class names, versions) are ignored
    return cls(**{k: tuple(v) if type(v) is list else v for k, v in config.items() if k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------------------------
# The DiT


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    # Defaults are diffusers' SkyReelsV2Transformer3DModel defaults, so a config.json that omits a key means the same.
    patch_size: tuple = (1, 2, 2)
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8192
    num_layers: int = 32
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: int | None = None  # I2V: width of the CLIP image tokens
    added_kv_proj_dim: int | None = None  # I2V: input width of the image key/value projections
    rope_max_seq_len: int = 1024  # positions per axis (frames, height, width) the rotary embedding covers
    pos_embed_seq_len: int | None = None  # first-last frame: tokens of the two images together
    inject_sample_info: bool = False  # DF: fps conditioning

    from_config = classmethod(fields_from)

    @property
    def dim(self):
        return self.num_attention_heads * self.attention_head_dim


# Named sizes; a checkpoint's variant adds switches, e.g. I2V: in_channels=36, image_dim=1280,
# added_kv_proj_dim=dim; first-last frame: pos_embed_seq_len=514; DF: inject_sample_info=True.
CONFIGS = {
    "tiny": DiTConfig(num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32, ffn_dim=48,
                      num_layers=2, rope_max_seq_len=32),
    "1.3B": DiTConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14B": DiTConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}


class LayerNorm32(nn.LayerNorm):
    """LayerNorm in float32, returned in x's dtype, as the reference's FP32LayerNorm (bf16 statistics would hurt)."""

    def forward(self, x):
        w, b = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class MLP(nn.Module):
    """Linear, activation, Linear, under diffusers' FeedForward names (net.0.proj, net.2; net.1 was a dropout)."""

    def __init__(self, dim_in, hidden, dim_out, act):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim_out)])
        self.net[0].proj = nn.Linear(dim_in, hidden)
        self.act = act

    def forward(self, x):
        return self.net[2](self.act(self.net[0].proj(x)))


class TwoLinear(nn.Module):
    """Linear, activation, Linear, under the names linear_1, linear_2 (the time and text embedders)."""

    def __init__(self, dim_in, dim, act):
        super().__init__()
        self.linear_1, self.linear_2, self.act = nn.Linear(dim_in, dim), nn.Linear(dim, dim), act

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def timestep_embedding(t, dim):
    """[cos | sin] of t (...) -> (..., dim), float64: at t ~ 1000 a float32 phase t * freq would be off by ~1e-4."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=t.device) / (dim // 2))
    phase = t.double()[..., None] * freqs  # (..., dim/2)
    return torch.cat([phase.cos(), phase.sin()], dim=-1)


@functools.lru_cache(maxsize=32)  # the same grids recur at every step
def rope_tables(head_dim, f, h, w, device, theta=10000.0):
    """3D rotary angles of an f x h x w token grid, cos and sin (f*h*w, head_dim/2) float32: each axis rotates the
    channel pairs of its own part of a head, height and width 2*(head_dim//6) channels each, frames the rest."""
    hw_dim = 2 * (head_dim // 6)
    pos = torch.meshgrid(*(torch.arange(n, dtype=torch.float64, device=device) for n in (f, h, w)), indexing="ij")
    angles = [p[..., None] * (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
              for p, d in zip(pos, (head_dim - 2 * hw_dim, hw_dim, hw_dim))]  # p (f, h, w) -> (f, h, w, d/2)
    grid = torch.cat(angles, dim=-1).flatten(0, 2)  # (f*h*w, head_dim/2), tokens in (frame, row, column) order
    return grid.cos().float(), grid.sin().float()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of x (B, H, L, Dh) by cos, sin (L, Dh/2) in float32, rounded once to x.dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, Dh/2) each
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


FLASH = None  # optional: flash_attn.cute's flash_attn_func (the flash-attn-4 package); skyreels sets it on Hopper


def attention(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v over heads (B, H, L, Dh): PyTorch's SDPA, or FLASH's kernel for 16-bit CUDA heads
    of 128 channels where it is set (1.2x cuDNN's on an H100 at 540P; the two agree to bf16 rounding)."""
    if FLASH is None or not q.is_cuda or q.dtype == torch.float32 or q.shape[-1] != 128:
        return F.scaled_dot_product_attention(q, k, v)
    return flash_attention(q, k, v)


@torch.compiler.disable  # a CuTe DSL kernel cannot be traced: compiled blocks call it as it is
def flash_attention(q, k, v):
    return FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0].transpose(1, 2)  # it takes (B, L, H, Dh)


def block_causal_attention(q, k, v, ends):
    """Queries of each causal block see the keys up to its end (ends: each block's end in q's tokens, ascending; keys
    may begin with cached blocks): an SDPA call per block over its prefix, each able to use the flash kernel, not an
    (L, L) mask (2.6 GB at 540P). Blocks may differ in size (an image's latent frame is a block of its own)."""
    out, offset, start = torch.empty_like(q), k.shape[2] - q.shape[2], 0
    for end in ends:
        out[:, :, start:end] = attention(q[:, :, start:end], k[:, :, :offset + end], v[:, :, :offset + end])
        start = end
    return out


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What the self-attention of every layer needs in one DiT forward. The caller sets the first four fields (counts
    in latent frames); DiT.forward fills in the rest once for its token grid and hands the object to every block."""
    causal_blocks: tuple = ()  # latent frames per causal block of x, in order: a block sees itself and those before
    cache: "KVCache | None" = None  # keys and values of whole blocks before x's frames (block-causal only)
    keep: int = 0  # leading frames of x (whole blocks that will not change again) that join the cache
    parallel: "SequenceParallel | None" = None  # the ranks that share this forward
    frame_tokens: int = 0  # tokens of one latent frame (h * w)
    rope: tuple = ()  # cos, sin (L, Dh/2) of this rank's tokens, at their positions after the cached frames
    kv: dict | None = None  # set for each layer: its slot of the cache
    reuse: dict | None = None  # TeaCache (the caller's): with reuse["skip"], reuse["residual"] replaces the blocks


class Attention(nn.Module):
    """Multi-head attention, q and k RMS-normed across heads: self- (attn: AttentionContext) or cross-attention to the
    text tokens plus, in I2V, the image tokens through their own key/value projections."""

    def __init__(self, dim, heads, eps, added_kv_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # to_out.1 was a dropout
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        if added_kv_dim is not None:
            self.add_k_proj, self.add_v_proj = nn.Linear(added_kv_dim, dim), nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def split_heads(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, D) -> (B, H, L, Dh)

    def forward(self, x, context=None, image_context=None, attn=None):
        source = x if context is None else context
        q = self.split_heads(self.norm_q(self.to_q(x)))
        k = self.split_heads(self.norm_k(self.to_k(source)))
        v = self.split_heads(self.to_v(source))
        out = attention(q, k, v) if attn is None else self.self_attention(q, k, v, attn)
        if image_context is not None:
            k_img = self.split_heads(self.norm_added_k(self.add_k_proj(image_context)))
            v_img = self.split_heads(self.add_v_proj(image_context))
            out = out + attention(q, k_img, v_img)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, L, D)

    def self_attention(self, q, k, v, attn):
        """q, k, v (B, H, L, Dh) of this rank's tokens -> the attention output (B, H, L, Dh) of the same tokens."""
        q, k = apply_rope(q, *attn.rope), apply_rope(k, *attn.rope)
        if attn.parallel is not None:  # this rank's tokens of every head -> every token of this rank's heads
            q, k, v = attn.parallel.to_heads(torch.stack([q, k, v])).unbind(0)
        if attn.kv is not None:
            k, v = extend_cache(attn.kv, k, v, attn.keep * attn.frame_tokens, attn.cache.limit * attn.frame_tokens)
        if attn.causal_blocks:
            out = block_causal_attention(q, k, v, [end * attn.frame_tokens for end in accumulate(attn.causal_blocks)])
        else:
            out = attention(q, k, v)
        return out if attn.parallel is None else attn.parallel.to_tokens(out, self.heads)


def modulate(norm, x, shift, scale):
    """norm(x) * (1 + scale) + shift, x (B, L, D), shift and scale (B, G, 1, D) broadcast per frame group (no (L, D)
    tensor). Float32 as the reference, rounded once."""
    y = norm(x.float()).unflatten(1, (shift.shape[1], -1))  # (B, G, L/G, D)
    return (y * (1 + scale) + shift).flatten(1, 2).type_as(x)


def gated_residual(x, y, gate):
    """x + y * gate per frame group (as `modulate`), summed in float32 as the reference, rounded once."""
    out = x.float().unflatten(1, (gate.shape[1], -1)) + y.unflatten(1, (gate.shape[1], -1)) * gate
    return out.flatten(1, 2).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm2 = LayerNorm32(dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm3 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.ffn = MLP(dim, cfg.ffn_dim, dim, gelu_tanh)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, context, image_context, mod, attn):
        """x (B, L, D); mod (B, G, 1, 6, D) float32, each frame group's timestep modulation; attn: AttentionContext."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + mod).unbind(-2)  # (B, G, 1, D)
        x = gated_residual(x, self.attn1(modulate(self.norm1, x, shift, scale), attn=attn), gate)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), context, image_context)
        return gated_residual(x, self.ffn(modulate(self.norm3, x, c_shift, c_scale)), c_gate)


class ImageEmbedder(nn.Module):
    """CLIP image tokens (+ first-last frame: a learned position table) -> model width: LayerNorm, MLP, LayerNorm."""

    def __init__(self, image_dim, dim, pos_embed_seq_len):
        super().__init__()
        self.norm1 = LayerNorm32(image_dim)
        self.ff = MLP(image_dim, image_dim, dim, F.gelu)
        self.norm2 = LayerNorm32(dim)
        self.pos_embed = (None if pos_embed_seq_len is None
                          else nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim)))

    def forward(self, x):
        if self.pos_embed is not None and x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"first-last-frame models take {self.pos_embed.shape[1]} image tokens, got {x.shape[1]}")
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))


class DiT(nn.Module):
    """The SkyReels-V2 diffusion transformer (Wan 2.1); random unless skyreels.load_component fills it (checkpoint)."""

    # Float32 whatever the load dtype, as diffusers' _keep_in_fp32_modules: the timestep MLP and the modulation
    # tables scale every residual update, and the norms' affine weights act on float32 normalised values.
    keep_fp32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

    def __init__(self, cfg):
        super().__init__()
        self.config, dim = cfg, cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        te = self.condition_embedder = nn.Module()  # a plain container that gives the checkpoint's key prefix
        te.time_embedder = TwoLinear(cfg.freq_dim, dim, F.silu)
        te.time_proj = nn.Linear(dim, 6 * dim)
        te.text_embedder = TwoLinear(cfg.text_dim, dim, gelu_tanh)
        te.image_embedder = None if cfg.image_dim is None else ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        if cfg.inject_sample_info:
            self.fps_embedding = nn.Embedding(2, dim)  # the two frame rates trained: 16 and 24
            self.fps_projection = MLP(dim, dim, 6 * dim, F.silu)
        # Some Wan-family checkpoints carry an unused query norm for the image tokens; diffusers skips it too.
        self.ignored_keys = tuple(f"blocks.{i}.attn2.norm_added_q." for i in range(cfg.num_layers))

    def forward(self, x, t, context, image_context=None, fps=None, attention=None):
        """The flow prediction (B, out_channels, F, H, W) for latents x (B, in_channels, F, H, W) at timesteps t (B,) or
        (B, F). context (B, L, text_dim): the text embedding; image_context (B, L_img, image_dim): CLIP's penultimate
        states of the image(s) (I2V); fps: 16 or 24 (inject_sample_info). attention: an AttentionContext (None: full
        attention, no cache, one process); with several ranks, each passes the same arguments and gets the result."""
        cfg, te, dtype = self.config, self.condition_embedder, self.patch_embedding.weight.dtype
        if (image_context is None) != (te.image_embedder is None):
            raise ValueError("image_context is required by image-to-video checkpoints, and only by them")
        if cfg.inject_sample_info and fps is None:
            raise ValueError("this checkpoint is conditioned on fps: pass fps (16 or 24)")
        B, pt, ph, pw = x.shape[0], *cfg.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        temb, mod = self.time_modulation(t.to(x.device).reshape(B, -1), f, fps)
        context = te.text_embedder(context.to(dtype))
        if image_context is not None:
            image_context = te.image_embedder(image_context.to(dtype))

        attn = self.attention_context(attention or AttentionContext(), (f, h, w), x.device)
        x = self.run_blocks(x, context, image_context, mod, attn)  # (B, f*h*w, D): this rank's rows of every frame

        shift, scale = (self.scale_shift_table + temb[:, :, None, None]).unbind(-2)  # (B, G, 1, D) float32
        x = self.proj_out(modulate(self.norm_out, x, shift, scale))  # (B, f*h*w, pt*ph*pw*C)
        if attn.parallel is not None:
            x = attn.parallel.gather(x)
        x = x.reshape(B, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.reshape(B, -1, f * pt, h * ph, w * pw)

    def run_blocks(self, x, context, image_context, mod, attn):
        """Latents x -> tokens through the block stack. With attn.reuse (TeaCache) its output - input is kept, or at a
        skipped step added. Tokens are made here so that nothing outside holds the stack's input (0.5 GB at 540P)."""
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (B, f*h*w, D)
        if attn.parallel is not None:  # from here to proj_out this rank holds its rows of every frame
            x = attn.parallel.shard(x)
        if attn.reuse and attn.reuse["skip"]:
            return x + attn.reuse["residual"]
        start = x if attn.reuse is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, context, image_context, mod, dataclasses.replace(attn, kv=attn.cache and attn.cache.layers[i]))
        if attn.cache is not None:
            attn.cache.frames += attn.keep
        if attn.reuse is not None:
            attn.reuse["residual"] = x - start
        return x

    def time_modulation(self, t, f, fps):
        """Timesteps t (B, G), G = 1 or f frame groups -> time embedding (B, G, D), modulation (B, G, 1, 6, D)."""
        cfg, te = self.config, self.condition_embedder
        if t.shape[1] not in (1, f):
            raise ValueError(f"t must hold one timestep per sample or per latent frame ({f}), got {t.shape[1]}")
        # The reference rounds the float32 time embedding to the model dtype, in which the projection runs.
        temb = te.time_embedder(timestep_embedding(t, cfg.freq_dim).float()).to(self.patch_embedding.weight.dtype)
        e = te.time_proj(F.silu(temb)).unflatten(-1, (6, -1))  # (B, G, 6, D)
        if cfg.inject_sample_info:
            index = torch.full(t.shape[:1], 0 if fps == 16 else 1, device=t.device)
            e = e + self.fps_projection(self.fps_embedding(index)).unflatten(-1, (6, -1))[:, None]  # + (B, 1, 6, D)
        return temb, e.float()[:, :, None]

    def attention_context(self, attention, grid, device):
        """attention checked, completed: rope at x's positions in grid (f, h, w) after the cache; this rank's rows."""
        (f, h, w), cfg, cache = grid, self.config, attention.cache
        blocks, keep = attention.causal_blocks, attention.keep
        before = cache.frames if cache is not None else 0  # cached frames: x's positions start after them
        if blocks and sum(blocks) != f:
            raise ValueError(f"causal_blocks {blocks} do not sum to the {f} latent frames given")
        if (before or keep) and (cache is None or not blocks or keep not in (0, *accumulate(blocks))
                                 or before + keep > cache.limit):
            raise ValueError("a KVCache holds whole causal blocks (of block-causal attention), up to its limit")
        if max(before + f, h, w) > cfg.rope_max_seq_len:
            raise ValueError(f"a {before + f}x{h}x{w} token grid exceeds rope_max_seq_len {cfg.rope_max_seq_len}")
        rope = tuple(t[before * h * w:] for t in rope_tables(cfg.attention_head_dim, before + f, h, w, device))
        parallel = attention.parallel and dataclasses.replace(attention.parallel, grid=grid)
        if parallel is not None:
            rope = tuple(parallel.shard(table) for table in rope)
        return dataclasses.replace(attention, parallel=parallel, frame_tokens=h * w, rope=rope)


# ----------------------------------------------------------------------------------------------------------------
# The CLIP vision tower (image-to-video checkpoints)


CLIP_ACTS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    from_config = classmethod(fields_from)

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported ({', '.join(CLIP_ACTS)})")


CLIP_CONFIGS = {  # defaults above are transformers' CLIPVisionConfig defaults
    "tiny": CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             image_size=32, patch_size=8, hidden_act="gelu"),
    "ViT-H/14": CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=16, patch_size=14, hidden_act="gelu"),
}


class CLIPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.act = cfg.num_attention_heads, CLIP_ACTS[cfg.hidden_act]
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        a = self.self_attn = nn.Module()
        a.q_proj, a.k_proj, a.v_proj, a.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, d)

    def forward(self, x):
        a, y = self.self_attn, self.layer_norm1(x)
        q, k, v = (p(y).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))  # (N, T, D)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class CLIPVision(nn.Module):
    """transformers' CLIPVisionModelWithProjection up to its penultimate hidden states, all SkyReels-V2 uses."""

    def __init__(self, cfg):
        super().__init__()
        self.config, d = cfg, cfg.hidden_size
        vm = self.vision_model = nn.Module()  # plain containers that give the checkpoint's key prefixes
        vm.embeddings = nn.Module()
        vm.embeddings.class_embedding = nn.Parameter(torch.randn(d) / d**0.5)
        vm.embeddings.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        vm.embeddings.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, d)
        vm.pre_layrnorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        vm.encoder = nn.Module()
        vm.encoder.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers - 1)])
        self.ignored_keys = (f"vision_model.encoder.layers.{cfg.num_hidden_layers - 1}.",
                             "vision_model.post_layernorm.", "visual_projection.")

    def forward(self, pixels):
        """pixels (N, 3, S, S) from clip_preprocess -> transformers' hidden_states[-2], (N, 1 + (S/patch)^2, hidden)."""
        emb = self.vision_model.embeddings
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, D)
        x = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + emb.position_embedding.weight
        x = self.vision_model.pre_layrnorm(x)
        for layer in self.vision_model.encoder.layers:
            x = layer(x)
        return x


def clip_preprocess(image, config):
    """A PIL image or (H, W, 3) uint8 array -> (1, 3, crop, crop) float32 pixels, as transformers' CLIPImageProcessor
    (PIL) with `config` image_processor/preprocessor_config.json: RGB (alpha over white), resize, crop, normalise."""
    if not all(config.get(f"do_{step}", True) for step in ("resize", "center_crop", "rescale", "normalize")):
        raise ValueError("CLIP preprocessing is supported with every step on (resize, crop, rescale, normalize)")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    image = image.convert("RGB")
    (w, h), short = image.size, config["size"]["shortest_edge"]
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # (w, h), int() as transformers
    image = image.resize(size, resample=config.get("resample", 3))
    ch, cw = config["crop_size"]["height"], config["crop_size"]["width"]
    top, left = (image.height - ch) // 2, (image.width - cw) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop {ch}x{cw} is larger than the resized image {image.height}x{image.width}")
    x = np.asarray(image)[top:top + ch, left:left + cw]  # (crop, crop, 3) uint8
    x = (x.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
    x = (x - np.array(config["image_mean"], np.float32)) / np.array(config["image_std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))  # (1, 3, crop, crop)


# ----------------------------------------------------------------------------------------------------------------
# Extras of the DiT: the asynchronous shortcuts' key/value cache, several ranks (sequence parallelism)


class KVCache:
    """Per layer, self-attention keys and values of the first `frames` latent frames (at most `limit`): block-causal, a
    frame's keys and values stop changing with its latent and timestep, so later calls pass only the frames after."""

    def __init__(self, num_layers, limit):
        self.frames, self.limit, self.layers = 0, limit, [{} for _ in range(num_layers)]


def extend_cache(kv, k, v, keep_tokens, capacity):
    """The cached keys and values followed by k, v (B, H, L, Dh); the first keep_tokens of k, v join the cache. The
    layer's slot kv holds a buffer of `capacity` tokens, which attention reads in place; tokens past it are joined."""
    if not kv:  # the first call: this layer's two buffers
        shape = (*k.shape[:2], capacity, k.shape[3])  # (B, H, capacity, Dh)
        kv.update(n=0, k=k.new_empty(shape), v=v.new_empty(shape))
    n, end = kv["n"], kv["n"] + k.shape[2]
    kv["n"] = n + keep_tokens
    if end <= capacity:
        kv["k"][:, :, n:end], kv["v"][:, :, n:end] = k, v
        return kv["k"][:, :, :end], kv["v"][:, :, :end]
    kv["k"][:, :, n:n + keep_tokens], kv["v"][:, :, n:n + keep_tokens] = k[:, :, :keep_tokens], v[:, :, :keep_tokens]
    return torch.cat([kv["k"][:, :, :n], k], dim=2), torch.cat([kv["v"][:, :, :n], v], dim=2)


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Ulysses sequence parallelism: the N ranks of `group` share one forward, each holding 1/N of the token rows of
    every latent frame (rows padded to a multiple of N), so the per-frame modulation sees equal frame groups. Around
    self-attention an all-to-all trades token shards for head shards (heads padded with zero heads: 12 on 8 ranks
    compute 16), so block-causal attention and the KVCache (N times smaller) work unchanged."""
    group: object
    grid: tuple = ()  # this forward's token grid (f, h, w)

    def split_rows(self, t):  # (..., f*h*w, C) -> (N, ..., f*hp/N*w, C), part r: rows r*hp/N... of each frame
        (f, h, w), n = self.grid, dist.get_world_size(self.group)
        t = F.pad(t.unflatten(-2, (f, h, w)), (0, 0, 0, 0, 0, -h % n))  # (..., f, hp, w, C)
        return t.unflatten(-3, (n, -1)).movedim(-4, 0).flatten(-4, -2)  # (N, ..., f, hp/N, w, C) -> flat tokens

    def join_rows(self, t):  # the inverse, pad rows dropped: (N, ..., f*hp/N*w, C) -> (..., f*h*w, C)
        f, h, w = self.grid
        t = t.unflatten(-2, (f, -1, w)).movedim(0, -4).flatten(-4, -3)  # (..., f, hp, w, C)
        return t[..., :h, :, :].flatten(-4, -2)

    def all_to_all(self, t):  # part i of t (N, ...) goes to rank i; part i of the result came from rank i
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, t.contiguous(), group=self.group)
        return out

    def to_heads(self, t):  # (S, B, H, L/N, Dh), this rank's tokens -> (S, B, Hp/N, L, Dh), this rank's heads
        n = dist.get_world_size(self.group)
        t = F.pad(t, (0, 0, 0, 0, 0, -t.shape[2] % n)).unflatten(2, (n, -1)).movedim(2, 0)  # (N, S, B, Hp/N, L/N, Dh)
        return self.join_rows(self.all_to_all(t))

    def to_tokens(self, t, heads):  # (B, Hp/N, L, Dh), this rank's heads -> (B, heads, L/N, Dh), this rank's tokens
        t = self.all_to_all(self.split_rows(t))  # (N, B, Hp/N, L/N, Dh): part i holds rank i's heads
        return t.movedim(0, 1).flatten(1, 2)[:, :heads]

    def shard(self, t):  # (..., f*h*w, C) -> (..., f*hp/N*w, C): this rank's rows of every frame
        return self.split_rows(t)[dist.get_rank(self.group)]

    def gather(self, x):  # (B, L/N, C) on every rank -> (B, L, C) on every rank
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return self.join_rows(torch.stack(parts))
