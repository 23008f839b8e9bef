"""fp8 weights: one-file DiTs in the three shared layouts, --fp8 on load, LoRAs on fp8 weights, bad files.

Oracles, all on the tiny DF folder, float32 compute on the CPU; each compares the final latents of a short guided
diffusion-forcing run (the VAE decode would only add time):
  - an fp8 file's DiT against the same DiT written as a float32 file of its dequantized weights (fp8 value times
    scale, which float32 holds exactly). An FP8Linear dequantizes to exactly those float32 values and calls the same
    F.linear, so the latents are equal, bit for bit (the tolerance is 0);
  - --fp8 against the file it would write, quantized here (max |W| / 448 per matrix, float8_e4m3fn): equal bytes;
  - a LoRA on fp8 weights against the same LoRA on the dequantized model, resident and with --offload: equal.
"""
import glob
import json
import os

import pytest
import torch
from conftest import HEIGHT, WIDTH
from safetensors.torch import load_file, save_file

import sample
import skyreels

SETTINGS = dict(prompt="a cat", negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_frames=5,
                num_inference_steps=2, guidance_scale=5.0, seed=0, output_type="latent", max_sequence_length=16)
LAYOUTS = {"plain": torch.float8_e4m3fn, "comfyui-scaled": torch.float8_e5m2, "comfyui-quant": torch.float8_e4m3fn}


def scale_keys(layout, layer, s):
    """What a layout writes beside the fp8 weight of `layer` (original naming) whose scale is s."""
    if layout == "comfyui-scaled":  # input scales: any valid value, they are unused
        return {f"{layer}.scale_weight": s, f"{layer}.scale_input": torch.tensor(0.5)}
    if layout == "comfyui-quant":
        quant = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        return {f"{layer}.weight_scale": s, f"{layer}.input_scale": torch.tensor(2.0), f"{layer}.comfy_quant": quant}
    return {}


def quantized(name, t):
    """The weights the shared loaders write in fp8: every Linear's of the blocks and of the fps projection."""
    return name.startswith(("blocks.", "fps_projection.")) and name.endswith(".weight") and t.ndim == 2


def fp8_file(folder, path, layout, scale=None):
    """The folder's DiT as one file in the original Wan naming, its Linear weights in fp8 with `scale` (a function of
    the matrix; plain: 1), and the float32 file of the same weights dequantized beside it. Returns both paths."""
    state = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    out, dequantized = {}, {}
    if layout == "comfyui-scaled":  # the marker; its dtype names the format
        out["scaled_fp8"] = torch.zeros(2, dtype=LAYOUTS[layout])
    for name, t in state.items():
        key = "diffusion_model." + skyreels.wan_name(name)
        if quantized(name, t):
            s = torch.tensor(1.0) if layout == "plain" else scale(t)
            out[key] = (t / s).to(LAYOUTS[layout])
            out.update(scale_keys(layout, key.removesuffix(".weight"), s))
            dequantized[key] = out[key].float() * s
        else:
            out[key] = dequantized[key] = t
    save_file(out, path)
    save_file({k: v.float() for k, v in dequantized.items()}, path + ".f32")
    return path, path + ".f32"


def known_scale(t):  # not the absmax rule: the loader must read the scale, not recompute it
    return t.abs().max() / 300


def load(folder, **kw):
    return skyreels.load(folder, device="cpu", dtype=torch.float32, **kw)


def raw(state):  # a state dict's tensors as bytes, so that fp8 tensors compare exactly
    return {k: v.contiguous().view(torch.uint8) if v.ndim else v.reshape(1).view(torch.uint8) for k, v in state.items()}


def same_state(a, b):
    a, b = raw(a.state_dict()), raw(b.state_dict())
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def files(tiny_folders, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    return {layout: fp8_file(tiny_folders["df"], str(d / f"{layout}.safetensors"), layout, known_scale)
            for layout in LAYOUTS}


# ----------------------------------------------------------------------------------------------------------------
# The three layouts load, stay fp8, and compute as their dequantized weights


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fp8_file_computes_as_its_dequantized_weights(tiny_folders, files, layout):
    fp8, dequantized = files[layout]
    pipe, reference = load(tiny_folders["df"], transformer=fp8), load(tiny_folders["df"], transformer=dequantized)
    assert pipe.fp8 == layout and reference.fp8 is None
    layers = [m for m in pipe.transformer.modules() if isinstance(m, skyreels.FP8Linear)]
    assert len(layers) == 2 * 10 + 2 and all(m.weight.dtype == LAYOUTS[layout] for m in layers)  # blocks, fps
    assert torch.equal(pipe.generate(**SETTINGS), reference.generate(**SETTINGS))


def test_fp8_weights_stream_as_fp8_under_offload(tiny_folders, files):
    """--offload: the blocks' host copies are fp8, and a block's slot holds a byte per fp8 weight; the latents are the
    resident DiT's."""
    resident, offloaded = (load(tiny_folders["df"], transformer=files["comfyui-quant"][0], offload=o)
                           for o in (False, True))
    blocks = offloaded.transformer.blocks
    host = dict(zip((n for n, _ in blocks[0].named_parameters()), blocks.host[0]))
    assert host["attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    assert blocks.slots[0][list(host).index("attn1.to_q.weight")].numel() == host["attn1.to_q.weight"].numel()
    assert torch.equal(resident.generate(**SETTINGS), offloaded.generate(**SETTINGS))


# ----------------------------------------------------------------------------------------------------------------
# --fp8: any checkpoint quantized on load


def test_fp8_flag_equals_loading_the_file_it_would_write(tiny_folders, tmp_path):
    """The oracle quantizes here: float8_e4m3fn, one scale per matrix, its largest magnitude / 448; the embeddings,
    the head, norms, biases and modulation tables stay float32. The text encoder is quantized alike."""
    folder = tiny_folders["df"]
    path, _ = fp8_file(folder, str(tmp_path / "q.safetensors"), "comfyui-quant", lambda t: t.abs().max() / 448)
    pipe, reference = load(folder, fp8=True), load(folder, transformer=path, fp8=True)
    assert pipe.fp8 == "quantized on load" and reference.fp8 == "comfyui-quant"
    assert same_state(pipe.transformer, reference.transformer)
    assert isinstance(pipe.transformer.proj_out, torch.nn.Linear)
    assert isinstance(pipe.transformer.condition_embedder.time_proj, torch.nn.Linear)
    text = {}
    for shard in glob.glob(os.path.join(folder, "text_encoder", "*.safetensors")):
        text.update(load_file(shard))
    for name, m in pipe.text_encoder.named_modules():
        if isinstance(m, skyreels.FP8Linear):
            w = text[name + ".weight"]
            assert torch.equal(m.scale, w.abs().max() / 448)
            assert torch.equal(m.weight.float(), (w / (w.abs().max() / 448)).to(torch.float8_e4m3fn).float())
    assert torch.equal(pipe.generate(**SETTINGS), reference.generate(**SETTINGS))


def test_fp8_flag_on_a_tiny_model_quantizes_it_in_memory():
    pipe = skyreels.load("tiny-df", device="cpu", dtype=torch.float32, fp8=True)
    assert pipe.fp8 == "quantized on load" and isinstance(pipe.transformer.blocks[0].ffn.net[2], skyreels.FP8Linear)
    assert pipe.generate("a cat", num_frames=5, num_inference_steps=1, output_type="latent").isfinite().all()


# ----------------------------------------------------------------------------------------------------------------
# LoRAs on fp8 weights


@pytest.fixture(scope="module")
def block0_lora(tmp_path_factory):
    """A LoRA on block 0 only (so that, under --offload, block 0 holds 16-bit weights and block 1 fp8 ones), in the
    original Wan naming, with a bias delta."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for module, (rows, cols) in (("blocks.0.self_attn.q", (24, 24)), ("blocks.0.ffn.0", (48, 24))):
        state[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(4, cols, generator=g) / 5
        state[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(rows, 4, generator=g) / 5
        state[f"diffusion_model.{module}.alpha"] = torch.tensor(8.0)
    state["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(24, generator=g)
    path = str(tmp_path_factory.mktemp("lora") / "block0.safetensors")
    save_file(state, path)
    return path


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_lora_on_fp8_equals_lora_on_the_dequantized_model_and_unloads_exactly(tiny_folders, files, block0_lora,
                                                                               offload):
    fp8, dequantized = files["comfyui-scaled"]
    pipe = load(tiny_folders["df"], transformer=fp8, offload=offload)
    before = {k: v.clone() for k, v in raw(pipe.transformer.state_dict()).items()}
    plain = pipe.generate(**SETTINGS)
    pipe.load_lora(block0_lora, 0.7)
    q = pipe.transformer.blocks[0].attn1.to_q
    assert q.weight.dtype == torch.float32 and float(q.scale) == 1.0  # touched: held in the compute dtype
    assert pipe.transformer.blocks[1].attn1.to_q.weight.dtype == torch.float8_e5m2
    reference = load(tiny_folders["df"], transformer=dequantized, loras=[(block0_lora, 0.7)])
    assert torch.equal(pipe.generate(**SETTINGS), reference.generate(**SETTINGS))
    pipe.unload_loras()
    after = raw(pipe.transformer.state_dict())
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert q.weight.dtype == torch.float8_e5m2
    assert torch.equal(pipe.generate(**SETTINGS), plain)


# ----------------------------------------------------------------------------------------------------------------
# Bad files: one line naming the file and the key

Q = "diffusion_model.blocks.0.self_attn.q"
BAD = {  # case: (change to the comfyui-scaled file, words the message must hold)
    "scale is NaN": ({f"{Q}.scale_weight": torch.tensor(float("nan"))}, f"{Q}.scale_weight"),
    "scale is zero": ({f"{Q}.scale_weight": torch.tensor(0.0)}, f"{Q}.scale_weight"),
    "scale is infinite": ({f"{Q}.scale_weight": torch.tensor(float("inf"))}, f"{Q}.scale_weight"),
    "scale is negative": ({f"{Q}.scale_weight": torch.tensor(-1.0)}, f"{Q}.scale_weight"),
    "per-channel scale": ({f"{Q}.scale_weight": torch.ones(24)}, f"{Q}.scale_weight"),
    "per-block scale": ({f"{Q}.scale_weight": torch.ones(2, 2)}, f"{Q}.scale_weight"),
    "input scale is NaN": ({f"{Q}.scale_input": torch.tensor(float("nan"))}, f"{Q}.scale_input"),
    "a weight without its scale": ({f"{Q}.scale_weight": None}, "blocks.0.attn1.to_q.scale"),
    "a scale of a 16-bit weight": ({"diffusion_model.head.head.scale_weight": torch.tensor(1.0)}, "head.head.scale"),
    "fp8 norm": ({"diffusion_model.blocks.0.norm3.weight": torch.ones(24, dtype=torch.float8_e5m2)}, "norm3.weight"),
    "fp8 bias": ({f"{Q}.bias": torch.ones(24, dtype=torch.float8_e5m2)}, f"{Q}.bias"),
    "fp8 modulation table": ({"diffusion_model.blocks.1.modulation": torch.ones(1, 6, 24, dtype=torch.float8_e5m2)},
                             "blocks.1.modulation"),
    "fp8 patch embedding": ({"diffusion_model.patch_embedding.weight": torch.ones(24, 16, 1, 2, 2).to(
        torch.float8_e5m2)}, "patch_embedding.weight"),
    "an nvfp4 layer": ({f"{Q}.weight": torch.zeros(24, 12, dtype=torch.uint8), f"{Q}.scale_weight": None,
                        f"{Q}.weight_scale": torch.ones(24, 1).to(torch.float8_e4m3fn),
                        f"{Q}.weight_scale_2": torch.tensor(1.0),
                        f"{Q}.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)},
                       f"{Q}.weight_scale"),
}


def bad_file(files, tmp_path, case):
    state = load_file(files["comfyui-scaled"][0])
    for key, t in BAD[case][0].items():
        if t is None:
            del state[key]
        else:
            state[key] = t
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    return path, BAD[case][1]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_file_is_one_line_naming_file_and_key(tiny_folders, files, tmp_path, case):
    path, needle = bad_file(files, tmp_path, case)
    with pytest.raises(skyreels.CheckpointError) as e:
        load(tiny_folders["df"], transformer=path)
    message = str(e.value)
    assert "\n" not in message and path in message and needle in message, message


@pytest.mark.parametrize("case", ["scale is NaN", "per-block scale", "fp8 norm", "a weight without its scale"])
def test_bad_fp8_file_on_the_command_line_is_one_error_line(tiny_folders, files, tmp_path, capsys, case):
    path, needle = bad_file(files, tmp_path, case)
    with pytest.raises(SystemExit) as stop:
        sample.main(["df", "--model", tiny_folders["df"], "--prompt", "a cat", "--transformer", path, "--height", "32",
                     "--width", "48", "--steps", "1", "--num-frames", "5", "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


# ----------------------------------------------------------------------------------------------------------------
# The JSON beside the video


@pytest.mark.parametrize("flags,source", [(["--transformer", "comfyui-scaled"], "comfyui-scaled"),
                                          (["--fp8"], "quantized on load"), ([], None)],
                         ids=["fp8 file", "--fp8", "16-bit"])
def test_the_json_beside_the_video_records_the_fp8_source(tiny_folders, files, tmp_path, flags, source):
    flags = [files[f][0] if f in files else f for f in flags]
    out = tmp_path / "v.mp4"
    sample.main(["df", "--model", tiny_folders["df"], "--prompt", "a cat", *flags, "--height", "32", "--width", "48",
                 "--steps", "1", "--num-frames", "5", "--seed", "0", "--out", str(out)])
    assert json.load(open(tmp_path / "v.json"))["fp8"] == source
