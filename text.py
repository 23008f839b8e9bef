"""The text condition, as Wan 2.1's: the UMT5-XXL encoder's last hidden state of a prompt cleaned, tokenized to 512
ids ending in </s> (UMT5's SentencePiece tokenizer), encoded, its rows past the prompt's own tokens set to zero:

    tokenizer = Tokenizer("…/tokenizer/spiece.model")
    encoder = skyreels.load_component(UMT5Encoder, UMT5Config, "…/text_encoder", torch.bfloat16, "cuda")
    context = encode_prompts(tokenizer, encoder, ["A cat and a dog baking a cake."])   # (1, 512, 4096)
"""
import dataclasses
import html
import math
import re

import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F


def fields_from(cls, config):  # from a config.json dict; keys not in cls (class names, versions) are ignored
    return cls(**{k: tuple(v) if type(v) is list else v for k, v in config.items() if k in cls.__dataclass_fields__})


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Sizes of the encoder, named as in text_encoder/config.json. The defaults are UMT5-XXL's."""
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64  # per head
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    from_config = classmethod(fields_from)

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"only the gated-gelu feed-forward of UMT5 is implemented, not {self.feed_forward_proj!r}")


CONFIGS = {  # named sizes; the tests' tiny encoder has the tiny test tokenizer's 325-piece vocabulary
    "tiny": UMT5Config(vocab_size=325, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
    "umt5-xxl": UMT5Config(),
}


# ----------------------------------------------------------------------------------------------------------------
# Prompts to token ids

# diffusers runs ftfy.fix_text first (not a dependency here). We do its two fixes that change ordinary prompts' tokens
# (curly quotes straightened, invisible controls dropped); the tokenizer's NFKC redoes others; mojibake ones: skipped.
_FTFY_FIXES = {
    **dict.fromkeys([0x02BC, *range(0x2018, 0x201C)], "'"),
    **dict.fromkeys(range(0x201C, 0x2020), '"'),
    **dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                     *range(0xFFF9, 0xFFFD)]),
}


def clean_prompt(text):
    """diffusers' prompt_clean (ftfy aside, see above): HTML entities unescaped twice, whitespace collapsed."""
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    text = html.unescape(html.unescape(text)).translate(_FTFY_FIXES)
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """Prompts cleaned as diffusers does, tokenized as T5Tokenizer (padding="max_length", truncation=True): the pieces,
    </s> (kept when truncating), <pad>, mask up to </s>; special tokens' text ("</s>" in "a</s>b") split out first."""

    def __init__(self, path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.specials = {self.sp.id_to_piece(i): i for i in (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())}
        self.special_text = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")

    def encode(self, text):
        """Token ids of one cleaned prompt, without </s>."""
        ids = []
        for part in self.special_text.split(text):  # the special tokens' text, and the text between them
            ids += [self.specials[part]] if part in self.specials else self.sp.encode(part)
        return ids

    def __call__(self, prompts, max_length=512):
        """prompts (a string or a list of B strings) -> ids, mask: (B, max_length) int64."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string or a non-empty list of strings")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        ids = torch.full((len(prompts), max_length), self.sp.pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(clean_prompt(prompt))[: max_length - 1] + [self.sp.eos_id()]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return ids, mask


# ----------------------------------------------------------------------------------------------------------------
# The UMT5 encoder. Module and parameter names follow the checkpoint: encoder.block.{i}.layer.{0,1}.…


class RMSNorm(nn.Module):
    """T5's layer norm: no mean, no bias; the mean square in float32, as the reference (bf16 would make it noisy)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_buckets(length, num_buckets, max_distance, device):
    """(L, L) bucket of key j seen from query i, as T5's encoder: half the buckets for keys after the query, half for
    the others; short distances get a bucket each, longer ones logarithmically wider buckets up to max_distance."""
    pos = torch.arange(length, device=device)
    relative = pos[None, :] - pos[:, None]  # (L, L): key minus query
    half, exact = num_buckets // 2, num_buckets // 4  # a direction's buckets; those of one distance each
    distance = relative.abs()
    # The float operations in the reference's order, so that distances on a bucket boundary round the same way.
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_ratio.long()).clamp(max=half - 1)
    return half * (relative > 0).long() + torch.where(distance < exact, distance, far)


def gelu_new(x):
    """T5's tanh GELU written out as transformers does: in bf16 each step rounds (F.gelu's, rounding once, differs)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Block(nn.Module):
    """Pre-norm residual self-attention, then a gated feed-forward, in containers named as the checkpoint's layers."""

    def __init__(self, cfg):
        super().__init__()
        self.layer, self.heads = nn.ModuleList([nn.Module(), nn.Module()]), cfg.num_heads
        attn, inner = nn.Module(), cfg.num_heads * cfg.d_kv
        attn.q, attn.k, attn.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        attn.o = nn.Linear(inner, cfg.d_model, bias=False)
        # UMT5 learns a position bias in every layer (T5 shares the first layer's).
        attn.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.layer[0].SelfAttention = attn
        self.layer[0].layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        ff = self.layer[1].DenseReluDense = nn.Module()
        ff.wi_0, ff.wi_1 = (nn.Linear(cfg.d_model, cfg.d_ff, bias=False) for _ in range(2))
        ff.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.layer[1].layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, buckets, keep):
        """x (B, L, d_model), buckets (L, L) long, keep (B, L) bool: False at padding."""
        attn, ff = self.layer[0].SelfAttention, self.layer[1].DenseReluDense
        y = self.layer[0].layer_norm(x)
        q, k, v = (p(y).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in (attn.q, attn.k, attn.v))
        bias = attn.relative_attention_bias(buckets).permute(2, 0, 1)  # (H, L, L)
        mask = torch.where(keep[:, None, None, :], bias, torch.finfo(bias.dtype).min)  # (B, H, L, L), not -inf
        # No 1/sqrt(d_kv) scaling: T5 folds it into the initialisation of q.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # (B, H, L, d_kv)
        x = x + attn.o(out.transpose(1, 2).flatten(2))
        y = self.layer[1].layer_norm(x)
        return x + ff.wo(gelu_new(ff.wi_0(y)) * ff.wi_1(y))


class UMT5Encoder(nn.Module):
    # transformers ties the encoder's embedding to `shared`; a checkpoint may store it under either name, or both.
    checkpoint_aliases = {"encoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleDict(dict(  # a dict only so that the names are the checkpoint's
            block=nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)]),
            final_layer_norm=RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)))

    def forward(self, ids, mask):
        """ids, mask (B, L) -> last hidden state (B, L, d_model); padding rows meaningless."""
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"ids and mask must be (batch, length), got {tuple(ids.shape)} and {tuple(mask.shape)}")
        c, device = self.config, self.shared.weight.device
        buckets = relative_position_buckets(ids.shape[1], c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance, device)
        keep, x = mask.to(device).bool(), self.shared(ids.to(device))
        for block in self.encoder["block"]:
            x = block(x, buckets, keep)
        return self.encoder["final_layer_norm"](x)


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts, max_length=512, device=None):
    """The DiT's text condition (B, max_length, d_model) on `device` (default: where computed): the encoder output over
    each prompt's tokens (</s> included), then exact zeros, as the DiT's cross-attention reads every row."""
    ids, mask = tokenizer(prompts, max_length)
    hidden = encoder(ids, mask)
    hidden = hidden.masked_fill(~mask.to(hidden.device).bool()[..., None], 0.0)  # ones, then zeros: a trim
    return hidden if device is None else hidden.to(device)
