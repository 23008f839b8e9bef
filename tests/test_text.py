"""text.py: prompt cleaning, tokenizer and UMT5 encoder, against transformers and diffusers at the same weights."""
import json
import os
import shutil
import unicodedata

import pytest
import torch
from safetensors.torch import load_file, save_file

import skyreels
import text
from conftest import CORPUS, diffusers_pipeline

def load_text_encoder(folder, dtype=torch.float32):
    return skyreels.load_component(text.UMT5Encoder, text.UMT5Config, folder, dtype)


PROMPTS = [
    "A cat and a dog baking a cake together in a kitchen.",
    "一只猫和一只狗在厨房里一起烤蛋糕。阳光透过窗户洒进来，厨房里很温馨。",
    "Le chat et le chien préparent un gâteau à la cuisine. Straße, Größe; Кошка; γάτος; con mèo.",
    "  repeated    spaces,\nnew\n\nlines\r\nand\ttabs\t ",
    "HTML entities: salt &amp;amp; pepper, &lt;b&gt;bold&lt;/b&gt;, &lt;s&gt;struck&lt;/s&gt;",
    "",
    "pieces the tiny vocabulary lacks: 龍 😀 ﬁne Ｆｕｌｌ　ｗｉｄｔｈ",
    "“curly quotes” and it’s, a bell\x07 and a byte-order mark\ufeff",
    "special tokens as text: <pad> </s><unk>",
]
LONG = " ".join(CORPUS * 3)  # over 512 tokens


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders["t2v"]


@pytest.fixture(scope="module")
def tokenizer(folder):
    return text.Tokenizer(os.path.join(folder, "tokenizer", "spiece.model"))


@pytest.fixture(scope="module")
def reference_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))


def reference_tokens(reference_tokenizer, prompts, max_length=512):
    from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2 import prompt_clean

    out = reference_tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length,
                              truncation=True, add_special_tokens=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def copy_text_encoder(folder, tmp_path):
    return shutil.copytree(os.path.join(folder, "text_encoder"), tmp_path / "text_encoder")


# ----------------------------------------------------------------------------------------------------------------
# Prompts to token ids


def test_clean_prompt_matches_diffusers_prompt_clean():
    """Oracle: diffusers' prompt_clean, which runs ftfy. Equal strings up to NFKC, which the tokenizer applies next
    anyway (ftfy narrows full-width punctuation such as "，", we leave that to the tokenizer)."""
    from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2 import prompt_clean

    for p in PROMPTS + [LONG]:
        assert unicodedata.normalize("NFKC", text.clean_prompt(p)) == unicodedata.normalize("NFKC", prompt_clean(p))


def test_token_ids_and_mask_match_transformers_tokenizer(tokenizer, reference_tokenizer):
    """Oracle: the folder's tokenizer loaded by transformers (tokenizer.json), after diffusers' cleaning; exact."""
    ids, mask = tokenizer(PROMPTS)
    ref_ids, ref_mask = reference_tokens(reference_tokenizer, PROMPTS)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


def test_special_token_text_becomes_special_ids(tokenizer):
    ids, mask = tokenizer(["a<pad>b</s>"], max_length=8)
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    assert ids[0].tolist() == a + [0] + b + [1, 1] + [0] * (8 - len(a + b) - 3)
    assert mask[0].sum() == len(a + b) + 3  # a literal <pad> is a real token: the mask counts it


def test_long_prompt_is_truncated_with_eos_last(tokenizer, reference_tokenizer):
    """Oracle: transformers' tokenizer; exact."""
    assert len(tokenizer.encode(text.clean_prompt(LONG))) > 512
    ids, mask = tokenizer([LONG])
    assert ids[0, -1] == 1 and bool(mask.all())
    ref_ids, ref_mask = reference_tokens(reference_tokenizer, [LONG])
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)


@pytest.mark.parametrize("bad", [
    lambda tok, enc: tok(5),
    lambda tok, enc: tok([]),
    lambda tok, enc: tok(["a", None]),
    lambda tok, enc: tok(["a"], max_length=0),
    lambda tok, enc: text.clean_prompt(b"bytes"),
    lambda tok, enc: text.encode_prompts(tok, enc, [3]),
    lambda tok, enc: enc(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)),
    lambda tok, enc: text.UMT5Config.from_config({"feed_forward_proj": "relu"}),
], ids=["not-a-list", "empty-list", "not-a-string", "max-length-0", "bytes", "encode-non-string", "1d-ids",
        "relu-config"])
def test_bad_input_raises_one_line_value_error(tokenizer, bad):
    encoder = text.UMT5Encoder(text.CONFIGS["tiny"])
    with pytest.raises(ValueError) as e:
        bad(tokenizer, encoder)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# The encoder


def test_config_from_config_json_ignores_unknown_keys(folder):
    with open(os.path.join(folder, "text_encoder", "config.json")) as f:
        config = json.load(f)
    assert text.UMT5Config.from_config(config) == text.CONFIGS["tiny"]


def test_relative_position_buckets_match_transformers():
    """Oracle: transformers' UMT5Attention._relative_position_bucket (encoder, bidirectional); exact, past 512."""
    from transformers import UMT5Config
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    attention = UMT5Attention(UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128),
                              has_relative_attention_bias=True)
    pos = torch.arange(600)
    expected = attention._relative_position_bucket(pos[None, :] - pos[:, None])
    assert torch.equal(text.relative_position_buckets(600, 32, 128, "cpu"), expected)


def test_padding_does_not_change_outputs_at_real_tokens():
    torch.manual_seed(0)
    encoder = text.UMT5Encoder(text.CONFIGS["tiny"])
    ids = torch.randint(3, 325, (1, 40))
    ids[0, 7] = 1
    short = encoder(ids[:, :16], (torch.arange(16) < 8).long()[None])
    long = encoder(ids, (torch.arange(40) < 8).long()[None])
    torch.testing.assert_close(short[:, :8], long[:, :8], atol=1e-6, rtol=0)


def test_encoder_matches_transformers_umt5(folder, tokenizer):
    """Oracle: transformers' UMT5EncoderModel.from_pretrained(text_encoder/), float32, on a padded batch of prompts
    of different lengths; max abs difference <= 1e-5 over every row. (It is 0 on CPU, the operations being the same;
    the margin is for a different SDPA kernel.)"""
    from transformers import UMT5EncoderModel

    reference = UMT5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=torch.float32).eval()
    ours = load_text_encoder(os.path.join(folder, "text_encoder"))
    ids, mask = tokenizer(PROMPTS[:4] + [LONG])
    assert len(set(mask.sum(1).tolist())) == 5
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert (got - expected).abs().max() <= 1e-5


def test_bfloat16_encoder_matches_transformers_exactly(folder, tokenizer):
    """Oracle: transformers' UMT5EncoderModel loaded in bfloat16 (it keeps no module in float32 for bf16). Exact:
    the same operations in the same order round the same way, gelu_new's tanh formula included."""
    from transformers import UMT5EncoderModel

    path = os.path.join(folder, "text_encoder")
    reference = UMT5EncoderModel.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids, mask = tokenizer(PROMPTS[:4] + [LONG])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = load_text_encoder(path, torch.bfloat16)(ids, mask)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_prompt_embeddings_match_diffusers_encode_prompt(folder, tokenizer):
    """Oracle: the diffusers pipeline's encode_prompt (what its transformer receives) for a prompt batch and its
    negative prompts, max_sequence_length 512, float32; max abs difference <= 1e-5, padding rows exactly zero."""
    pipe = diffusers_pipeline(folder)
    prompts, negatives = [PROMPTS[0], PROMPTS[1]], [PROMPTS[4], ""]
    with torch.no_grad():  # as in the pipeline's __call__ (with gradients on, SDPA takes another kernel)
        expected, expected_negative = pipe.encode_prompt(prompt=prompts, negative_prompt=negatives,
                                                         do_classifier_free_guidance=True, max_sequence_length=512)
    encoder = load_text_encoder(os.path.join(folder, "text_encoder"))
    for batch, reference in ((prompts, expected), (negatives, expected_negative)):
        got = text.encode_prompts(tokenizer, encoder, batch)
        assert got.shape == reference.shape == (2, 512, 32)
        assert (got - reference).abs().max() <= 1e-5
        _, mask = tokenizer(batch)
        assert not got[~mask.bool()].any()


# ----------------------------------------------------------------------------------------------------------------
# Loading


def test_sharded_checkpoint_loads_strictly(folder):
    path = os.path.join(folder, "text_encoder")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    assert len(set(index.values())) == 5
    encoder = load_text_encoder(path)
    state = encoder.state_dict()
    assert set(state) == set(index)
    for key, shard in index.items():
        assert torch.equal(state[key], load_file(os.path.join(path, shard))[key]), key


@pytest.mark.parametrize("keys", [["encoder.embed_tokens.weight"], ["shared.weight", "encoder.embed_tokens.weight"]],
                         ids=["embed_tokens-only", "both"])
def test_embedding_stored_as_encoder_embed_tokens_loads(folder, tmp_path, keys):
    path = copy_text_encoder(folder, tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"].pop("shared.weight")
    tensors = load_file(path / shard)
    embedding = tensors.pop("shared.weight")
    for key in keys:
        tensors[key] = embedding.clone()  # safetensors stores no two names for one tensor
        index["weight_map"][key] = shard
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    encoder = load_text_encoder(str(path))
    assert torch.equal(encoder.shared.weight, embedding)


def test_missing_shard_raises_checkpoint_error_naming_it(folder, tmp_path):
    path = copy_text_encoder(folder, tmp_path)
    (path / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(skyreels.CheckpointError, match="model-00003-of-00005.safetensors") as e:
        load_text_encoder(str(path))
    assert "\n" not in str(e.value)


def test_truncated_shard_raises_checkpoint_error_naming_it(folder, tmp_path):
    path = copy_text_encoder(folder, tmp_path)
    shard = path / "model-00001-of-00005.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(skyreels.CheckpointError, match="model-00001-of-00005.safetensors") as e:
        load_text_encoder(str(path))
    assert "\n" not in str(e.value)


def test_bfloat16_load_gives_bf16_parameters_and_nothing_on_meta(folder, tokenizer):
    encoder = load_text_encoder(os.path.join(folder, "text_encoder"), torch.bfloat16)
    keep_fp32 = getattr(encoder, "keep_fp32", ())
    for name, p in encoder.named_parameters():
        assert not p.is_meta, name
        assert p.dtype == (torch.float32 if any(s in name for s in keep_fp32) else torch.bfloat16), name
    assert text.encode_prompts(tokenizer, encoder, PROMPTS[:2], 512, "cpu").dtype == torch.bfloat16
