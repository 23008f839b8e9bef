"""The causal video VAE of Wan 2.1, which every SkyReels-V2 model uses (8x smaller in space, 4x in time, 16 channels).

Every convolution is causal in time, so a video can go through a piece at a time with the result of one whole pass:
each layer keeps what it needs of the previous piece in a cache, a plain dict {layer: state} new for each video (a layer
that finds no entry is at the video's first chunk). Parameter names are diffusers' AutoencoderKLWan keys (strict load).
Only inference is implemented (no dropout, no posterior sampling: the pipelines use the posterior mean).
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F


def fields_from(cls, config):  # from a config.json dict; keys not in cls (class names, versions) are ignored
    return cls(**{k: tuple(v) if type(v) is list else v for k, v in config.items() if k in cls.__dataclass_fields__})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temperal_downsample: tuple = (False, True, True)  # sic, the checkpoint's spelling; per stage, encoder order
    # Per-channel statistics of the latents, which the DiT sees normalised (see VAE.normalize).
    latents_mean: tuple = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                           0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latents_std: tuple = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                          3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
    is_residual: bool = False  # true: the Wan 2.2 VAE, another network

    from_config = classmethod(fields_from)

    def __post_init__(self):
        if self.is_residual:
            raise ValueError("this is a Wan 2.2 VAE (is_residual: true); SkyReels-V2 uses the Wan 2.1 VAE")
        if self.attn_scales:  # diffusers and the original Wan code disagree on where these go; no checkpoint has any
            raise ValueError(f"attn_scales must be empty (attention only in the middle blocks), got {self.attn_scales}")


CONFIGS = {
    "wan2.1": VAEConfig(),  # the official VAE of every SkyReels-V2 checkpoint
    "tiny": VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),  # the tests' tiny checkpoints
}


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded in time only on the past side, by 2 * padding[0] frames (zeros at a video's start). Such
    go frame by frame, each tap in time a 2D convolution adding a term to this or a later output frame; the cache keeps
    the sums in progress, or the last input frames where those are smaller."""

    def __init__(self, in_dim, out_dim, kernel, stride=1, padding=0):
        pt, ph, pw = padding if isinstance(padding, tuple) else (padding,) * 3
        super().__init__(in_dim, out_dim, kernel, stride, padding=(0, ph, pw))
        self.past = 2 * pt

    def tap(self, frame, k):
        w = self.weight[:, :, -1 - k]  # (C_out, C_in, kh, kw): from a frame to the output k frames later
        return F.conv2d(frame, w, self.bias if k == 0 else None, self.stride[1:], self.padding[1:])

    def forward(self, x, cache=None):
        if not self.past:
            return super().forward(x)
        out = []
        for frame in x.unbind(2):  # (B, C, H, W)
            frame = frame.contiguous(memory_format=torch.channels_last)  # cuDNN's layout: no conversion per call
            if self.in_channels < self.out_channels:
                past = cache.pop(self, []) + [frame]  # the last input frames, oldest first (fewer at a start)
                out.append(self.tap(frame, 0))
                for k in range(1, len(past)):
                    out[-1] += self.tap(past[-1 - k], k)
                cache[self] = past[-self.past:]
            else:
                sums = cache.setdefault(self, [])  # sums[k]: the terms so far of the output frame k frames ahead
                for k in range(len(sums)):  # this frame's term of the outputs already begun...
                    sums[k].add_(self.tap(frame, k))
                sums += [self.tap(frame, k) for k in range(len(sums), self.past + 1)]  # ...and of the ones it begins
                out.append(sums.pop(0))
        return out[0].unsqueeze(2) if len(out) == 1 else torch.stack(out, dim=2)  # no copy for one frame


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(C) * gamma, the norm taken over channels (dim 1) at each pixel."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        # As the reference's float32 copy of a bf16 x, without the copy: the norm in float32, divided into x's dtype.
        acc = torch.promote_types(x.dtype, torch.float32)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=acc).clamp_min(1e-12)
        return torch.div(x, norm, out=torch.empty_like(x)).mul_(self.gamma * self.scale)


def upsample_conv(x, conv):
    """conv(nearest 2x upsampling of x), (B, C, H, W) -> (B, C', 2H, 2W) channels-last, in a quarter of the work: output
    row 2i + p sees rows i - 1 + p, i + p only, through kernel rows summed (fold[p]): each phase p, q is a 2x2 conv."""
    b, _, h, w = x.shape
    out = x.new_empty(b, 2 * h, 2 * w, conv.out_channels).permute(0, 3, 1, 2)
    fold = x.new_tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])  # phase p: kernel rows 0-2 -> 2 rows
    for p, q in ((0, 0), (0, 1), (1, 0), (1, 1)):
        kernel = torch.einsum("ak,oikl,bl->oiab", fold[p], conv.weight, fold[q])  # (C', C, 2, 2)
        out[:, :, p::2, q::2] = F.conv2d(x, kernel, conv.bias, padding=1)[:, :, p:p + h, q:q + w]
    return out


class Resample(nn.Module):
    """2x up- or downsampling in space, a frame at a time; the '3d' modes also in time: up, each frame becomes two by a
    causal conv (a video's first stays one); down, a stride-2 conv over the previous chunk's last frame and this one."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):  # the conv also halves the channels
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:  # pad right and bottom only, so that output pixel (i, j) covers input pixels 2i..2i+2, 2j..2j+2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        x = torch.stack([self.resample(frame) for frame in x.unbind(2)], dim=2)
        if self.mode == "downsample3d":
            last = x[:, :, -1:].clone()
            if self.time_conv in cache:  # 1 + 4 frames -> 2, 1 + 2 frames -> 1
                x = self.time_conv(torch.cat([cache[self.time_conv], x], dim=2))
            cache[self.time_conv] = last
        return x

    def frames(self, x, cache):
        """Upsampling: (B, C, T, H, W) -> a list of (B, C/2, 2H, 2W) frames, each made alone (to be freed alone)."""
        frames = x.unbind(2)  # (B, C, H, W)
        if self.mode == "upsample3d" and self.time_conv in cache:
            x = self.time_conv(x, cache)  # (B, 2C, T, H, W): each frame's two output frames, stacked in channels
            frames = [pair for frame in x.unbind(2) for pair in frame.chunk(2, dim=1)]  # (B, C, H, W), in time order
        elif self.mode == "upsample3d":  # a video's first frame stays one, nor is it (as officially) the next's past
            cache[self.time_conv] = []
        return [upsample_conv(frame, self.resample[1]) for frame in frames]


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x), inplace=True), cache)  # in place: the norm's output is ours to reuse
        x = F.silu(self.norm2(x), inplace=True)  # a statement of its own, so that conv1's output is freed before conv2
        return self.conv2(x, cache).add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (never across frames, which keeps it causal)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C, H, W)
        qkv = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(1)  # (B*T, 1, H*W, 3C)
        y = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # (B*T, 1, H*W, C)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.unflatten(0, (b, t)).transpose(1, 2)  # (B, C, T, H, W)


class MidBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, cache):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache)), cache)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = self.down_blocks = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(d_out, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)  # posterior mean and log-variance

    def forward(self, x, cache):
        # Up to the first downsampling in time every layer is causal and works frame by frame, so a chunk's frames
        # go through it one at a time (exact): a quarter of the full-resolution activations are alive at once.
        split = next((i for i, b in enumerate(self.down_blocks) if getattr(b, "mode", "") == "downsample3d"),
                     len(self.down_blocks))
        frames = []
        for frame in x.split(1, dim=2):
            frame = self.conv_in(frame, cache)
            for block in self.down_blocks[:split]:
                frame = block(frame, cache)
            frames.append(frame)
        x = torch.cat(frames, dim=2)
        del frames
        for block in self.down_blocks[split:]:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True), cache)


class UpBlock(nn.Module):
    def __init__(self, in_dim, out_dim, num_res_blocks, mode):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                      for j in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)] if mode else [])


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks = self.up_blocks = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None if i == len(dims) - 2 else "upsample3d" if temporal[i] else "upsample2d"
            # every upsampler halves the channels, so each later block receives half its predecessor's width
            blocks.append(UpBlock(d_in if i == 0 else d_in // 2, d_out, cfg.num_res_blocks, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def forward(self, z, cache):
        """One latent frame (B, z_dim, 1, h, w) -> its frames: one for a video's first latent frame, four after."""
        return self.upsample(self.mid_block(self.conv_in(z, cache), cache), 0, cache)

    def upsample(self, x, i, cache):
        """Up blocks i, i+1, ... and the head, depth first: each frame block i makes goes all the way to pixels
        before the next starts (exact: every layer is causal and cached), so one full-size frame is alive at a time."""
        block = self.up_blocks[i]
        for layer in block.resnets:  # not block(x): a module call holds x until it returns
            x = layer(x, cache)
        if not block.upsamplers:  # the last block
            return self.conv_out(F.silu(self.norm_out(x), inplace=True), cache)
        frames, out = block.upsamplers[0].frames(x, cache), []
        del x
        while frames:  # popped, so that each frame is freed as soon as the next block is done with it
            out.append(self.upsample(frames.pop(0).unsqueeze(2), i + 1, cache))
        return torch.cat(out, dim=2)


class VAE(nn.Module):
    """encode: video -> latents. decode: latents -> video, whole or in pieces. normalize / denormalize: latents to
    and from the scale the DiT works at. skyreels.load_component builds one from a checkpoint folder."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.temporal = 2 ** sum(cfg.temperal_downsample)  # 4 in every checkpoint
        self.spatial = 2 ** (len(cfg.dim_mult) - 1)  # 8 in every checkpoint
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    @torch.no_grad()
    def encode(self, video):
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior mean (B, z_dim, 1 + k, H/8, W/8), not normalised. As the
        official VAE: the first frame alone, then four frames at a time, the cache carried between them."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects video of shape (B, 3, F, H, W), got {tuple(video.shape)}")
        f, h, w = video.shape[2:]
        if (f - 1) % self.temporal:
            raise ValueError(f"encode needs 1 + {self.temporal}k frames, got {f}")
        if h % self.spatial or w % self.spatial:
            raise ValueError(f"video height and width must be multiples of {self.spatial}, got {h}x{w}")
        cache, z = {}, self.cfg.z_dim
        chunks = video.split([1] + [self.temporal] * ((f - 1) // self.temporal), dim=2)
        return torch.cat([self.quant_conv(self.encoder(chunk, cache))[:, :z] for chunk in chunks], dim=2)

    @torch.no_grad()
    def decode(self, latents, cache=None):
        """Latents (B, z_dim, T, h, w), not normalised -> video (B, 3, F, 8h, 8w) in [-1, 1]; a first latent frame makes
        one frame, later ones four. Pieces in order with one `cache` (a dict, empty at first): one decode, bounded memory."""
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(f"decode takes latents shape (B, {self.cfg.z_dim}, T, h, w), got {tuple(latents.shape)}")
        frames = self.temporal * latents.shape[2] - (self.temporal - 1) * (not cache)  # a video's first: one frame
        cache = {} if cache is None else cache
        x = self.post_quant_conv(latents)
        out, at = x.new_empty(x.shape[0], 3, frames, self.spatial * x.shape[3], self.spatial * x.shape[4]), 0
        for t in range(x.shape[2]):  # written into one preallocated video: a list then torch.cat would hold it twice
            y = self.decoder(x[:, :, t:t + 1], cache).clamp_(-1, 1)
            out[:, :, at:at + y.shape[2]] = y
            at += y.shape[2]
        return out

    # The DiT works on normalised latents. The arithmetic follows the diffusers pipelines exactly (the statistics
    # cast to z's dtype, then the reciprocal of std; multiply to normalise, divide to undo): rounding shows at 1e-5.

    def latent_stats(self, z):  # mean, 1 / std, (1, z_dim, 1, 1, 1)
        mean, std = (torch.tensor(s, dtype=torch.float32).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
                     for s in (self.cfg.latents_mean, self.cfg.latents_std))
        return mean, 1.0 / std

    def normalize(self, z):  # encoder latents -> what the DiT sees
        mean, inv_std = self.latent_stats(z)
        return (z - mean) * inv_std

    def denormalize(self, z):  # what the DiT makes -> latents for decode
        mean, inv_std = self.latent_stats(z)
        return z / inv_std + mean
