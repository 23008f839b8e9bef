"""LoRA files in the three shared formats, and whole DiT files in the original Wan naming.

Oracles (diffusers 0.42.1 with peft, on the tiny official-layout folders, float32 on CPU):
  - the frames of diffusers' pipeline after `load_lora_weights` + `set_adapters(names, scales)` (PEFT layers computed
    beside the base weights), against ours with the LoRAs folded into the weights: within 1e-4 (float32 reordering
    leaves ~1e-6), as tests/test_pipeline.py;
  - diffusers' own key converters (`_convert_non_diffusers_wan_lora_to_diffusers`, `_convert_musubi_wan_lora_to_
    diffusers`, `convert_wan_transformer_to_diffusers`) for our table of original names;
  - `SkyReelsV2Transformer3DModel.from_single_file` for whole transformers in the original naming: equal weights.
A LoRA here is drawn at random (rank 4, lora_alpha 8, so alpha/rank = 2 matters) on every attn1/attn2/ffn Linear, with
peft on diffusers' transformer and saved by diffusers' `save_lora_weights`; the other formats are the same LoRA
rewritten.
"""
import json
import os

import numpy as np
import pytest
import torch
from conftest import HEIGHT, WIDTH, image, max_abs, parity_settings, run_both
from safetensors.torch import load_file, save_file

import model
import skyreels

RANK, ALPHA = 4, 8.0
TARGETS = r".*blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))"
TOL = 1e-4


def peft_lora(folder, path, seed):
    """A LoRA made with peft on diffusers' transformer, saved as diffusers saves one (with its adapter config)."""
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = SkyReelsV2Transformer3DModel.from_pretrained(os.path.join(folder, "transformer"))
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:  # peft starts B at zero; a trained LoRA's is not
                p.copy_(0.1 * torch.randn(p.shape, generator=g) / RANK ** 0.5)
    SkyReelsV2Pipeline.save_lora_weights(os.path.dirname(path), get_peft_model_state_dict(transformer),
                                         weight_name=os.path.basename(path),
                                         transformer_lora_adapter_metadata=config.to_dict())
    return path


def original_module(key):
    """transformer.blocks.0.attn1.to_q.lora_A.weight -> (blocks.0.self_attn.q, 'A')."""
    module, part = key.removeprefix("transformer.").split(".lora_")
    return skyreels.wan_name(module + ".weight").removesuffix(".weight"), part[0]


def rewrite(peft_file, fmt, path):
    """The same LoRA in the original Wan / ComfyUI keys or kohya / musubi-tuner keys, each pair with an .alpha."""
    out = {}
    for key, t in load_file(peft_file).items():
        module, part = original_module(key)
        if fmt == "wan":
            name = f"diffusion_model.{module}"
        else:
            name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if part == 'A' else 'lora_up'}.weight"] = t
        out[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(out, path)
    return path


@pytest.fixture(scope="module")
def loras(tiny_folders, tmp_path_factory):
    """{name: file}: a PEFT LoRA, the same in the other two formats, and a second PEFT LoRA. All fit every tiny
    folder (same widths); on the I2V folder they are T2V LoRAs (no image projections)."""
    d = tmp_path_factory.mktemp("loras")
    files = dict(peft=peft_lora(tiny_folders["t2v"], str(d / "peft.safetensors"), 1),
                 other=peft_lora(tiny_folders["t2v"], str(d / "other.safetensors"), 2))
    files["wan"] = rewrite(files["peft"], "wan", str(d / "wan.safetensors"))
    files["kohya"] = rewrite(files["peft"], "kohya", str(d / "kohya.safetensors"))
    return files


@pytest.fixture
def reference(references):
    """reference(kind, loras, scales): the module's diffusers pipeline for a tiny folder with LoRAs loaded as PEFT
    layers at those scales; they are unloaded after the test, which leaves the pipeline as loaded."""
    used = []

    def with_loras(kind, loras, scales):
        ref = references(kind)
        names = [f"l{i}" for i in range(len(loras))]
        for name, path in zip(names, loras):
            ref.load_lora_weights(path, adapter_name=name)
        ref.set_adapters(names, scales)
        used.append(ref)
        return ref

    yield with_loras
    for ref in used:
        ref.unload_lora_weights()


# ----------------------------------------------------------------------------------------------------------------
# The table of original names, against diffusers' converters


def test_original_lora_keys_convert_back_with_diffusers_converters(loras):
    """Our rewrite into the original-Wan and kohya keys (through wan_name) is what diffusers' converters read back
    as the PEFT LoRA: same modules, same alpha/rank * up @ down."""
    from diffusers.loaders.lora_conversion_utils import (_convert_musubi_wan_lora_to_diffusers,
                                                         _convert_non_diffusers_wan_lora_to_diffusers)

    peft = load_file(loras["peft"])
    for fmt, convert in (("wan", _convert_non_diffusers_wan_lora_to_diffusers),
                         ("kohya", _convert_musubi_wan_lora_to_diffusers)):
        converted = convert(load_file(loras[fmt]))
        assert set(converted) == set(peft), fmt
        for key in (k for k in peft if "lora_A" in k):
            up = key.replace("lora_A", "lora_B")
            assert torch.allclose(converted[up] @ converted[key], ALPHA / RANK * peft[up] @ peft[key], atol=1e-6)


def test_every_linear_maps_to_the_module_diffusers_lora_converter_names(tiny_folders, tmp_path):
    """A LoRA on every Linear of the I2V DiT in the original naming, with a bias delta (diff_b) on each: diffusers'
    converter and ours (read_lora) agree on the module of every key (embeddings, head and image projections too)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    dit = skyreels.load_component(model.DiT, model.DiTConfig, os.path.join(tiny_folders["i2v"], "transformer"))
    linears = [n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)]
    state = {}
    for name in linears:
        w = dit.get_submodule(name).weight
        theirs = "diffusion_model." + skyreels.wan_name(name + ".weight").removesuffix(".weight")
        state[f"{theirs}.lora_down.weight"] = torch.randn(2, w.shape[1])
        state[f"{theirs}.lora_up.weight"] = torch.randn(w.shape[0], 2)
        state[f"{theirs}.diff_b"] = torch.randn(w.shape[0])
    converted = _convert_non_diffusers_wan_lora_to_diffusers(dict(state))
    assert {k.removeprefix("transformer.").split(".lora_")[0] for k in converted} == set(linears)
    path = str(tmp_path / "all_linears.safetensors")
    save_file(state, path)
    ours = {name for name, *_ in skyreels.read_lora(path, dit)}
    assert ours == {f"{n}.{p}" for n in linears for p in ("weight", "bias")}


def test_original_names_agree_with_diffusers_single_file_converter(tiny_folders):
    """Every parameter of every tiny DiT, named by wan_name, comes back to its name through diffusers'
    convert_wan_transformer_to_diffusers, but for the two the converter does not know (it leaves them as they are):
    SkyReels-V2's fps_projection (nn.Sequential 0/2 in the original code) and the first-last-frame img_emb.emb_pos."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    for kind, path in tiny_folders.items():
        dit = skyreels.load_component(model.DiT, model.DiTConfig, os.path.join(path, "transformer"))
        names = {skyreels.wan_name(k): k for k in dit.state_dict()}
        converted = convert_wan_transformer_to_diffusers(dict(names))
        unknown = {k for k in names if k.startswith(("fps_projection.", "img_emb.emb_pos"))}
        assert {k: v for k, v in converted.items() if k not in unknown} == {v: v for k, v in names.items()
                                                                            if k not in unknown}, kind
        assert {names[k] for k in unknown} <= {"fps_projection.net.0.proj.weight", "fps_projection.net.0.proj.bias",
                                               "fps_projection.net.2.weight", "fps_projection.net.2.bias",
                                               "condition_embedder.image_embedder.pos_embed"}


# ----------------------------------------------------------------------------------------------------------------
# Parity of the frames with diffusers


@pytest.mark.parametrize("fmt", ["peft", "wan", "kohya"])
def test_t2v_with_a_lora_matches_diffusers(tiny_folders, pipes, loras, reference, fmt):
    ours = skyreels.load(tiny_folders["t2v"], device="cpu", dtype=torch.float32, loras=[(loras[fmt], 0.8)])
    settings = parity_settings(num_frames=9)
    out, ref = run_both(reference("t2v", [loras[fmt]], [0.8]), ours, settings, dict(settings, shift=8.0))
    assert max_abs(out, ref) <= TOL
    if fmt == "peft":  # and the LoRA matters
        assert max_abs(out, pipes["t2v"].generate(seed=0, **settings)) > 0.01


def test_two_loras_at_different_scales_match_diffusers_in_df(tiny_folders, loras, reference):
    ours = skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32, loras=[(loras["kohya"], 0.7)])
    ours.load_lora(loras["other"], -0.5)  # LoRAs add up, loaded together or one after another
    settings = parity_settings(num_frames=17, ar_step=1, causal_block_size=1)
    out, ref = run_both(reference("df", [loras["peft"], loras["other"]], [0.7, -0.5]), ours, settings,
                        dict(settings, shift=8.0))
    assert max_abs(out, ref) <= TOL


def test_t2v_lora_on_i2v_model_leaves_the_image_projections_alone_as_diffusers(tiny_folders, loras, reference):
    ours = skyreels.load(tiny_folders["i2v"], device="cpu", dtype=torch.float32)
    before = {k: v.clone() for k, v in ours.transformer.state_dict().items() if "add_" in k}
    ours.load_lora(loras["wan"])
    assert all(torch.equal(v, ours.transformer.state_dict()[k]) for k, v in before.items())
    settings = parity_settings(num_frames=9, image=image(0, (50, 37)))
    out, ref = run_both(reference("i2v", [loras["wan"]], [1.0]), ours, settings, dict(settings, shift=5.0))
    assert max_abs(out, ref) <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Folding, undoing, full deltas, offload


def test_fold_is_float32_rounded_once_and_unload_restores_exactly(tiny_folders, loras):
    """In bfloat16, W + d - d is not W: unload_loras puts back the kept originals."""
    folder = tiny_folders["t2v"]
    pipe = skyreels.load(folder, device="cpu", dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora(loras["peft"], 0.8)
    pipe.load_lora(loras["other"], 0.3)
    lora, other = load_file(loras["peft"]), load_file(loras["other"])
    delta = lambda sd: ALPHA / RANK * (sd["transformer.blocks.1.ffn.net.2.lora_B.weight"]  # noqa: E731
                                       @ sd["transformer.blocks.1.ffn.net.2.lora_A.weight"])
    name = "blocks.1.ffn.net.2.weight"
    first = (original[name].float() + 0.8 * delta(lora)).bfloat16()
    assert torch.equal(pipe.transformer.state_dict()[name], (first.float() + 0.3 * delta(other)).bfloat16())
    pipe.unload_loras()
    assert all(torch.equal(v, original[k]) for k, v in pipe.transformer.state_dict().items())


def test_full_weight_and_bias_deltas_are_added_at_the_scale(tiny_folders, tmp_path):
    """.diff (a whole weight) and .diff_b (a bias) deltas of the original format, as ComfyUI applies them."""
    pipe = skyreels.load(tiny_folders["t2v"], device="cpu", dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    diff, diff_b, head_b = torch.randn(24, 24), torch.randn(24), torch.randn(64)
    path = str(tmp_path / "diff.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": diff, "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b,
               "diffusion_model.head.head.diff_b": head_b}, path)
    pipe.load_lora(path, 0.5)
    after = pipe.transformer.state_dict()
    assert torch.equal(after["blocks.0.attn1.to_q.weight"], before["blocks.0.attn1.to_q.weight"] + 0.5 * diff)
    assert torch.equal(after["blocks.0.attn1.to_q.bias"], before["blocks.0.attn1.to_q.bias"] + 0.5 * diff_b)
    assert torch.equal(after["proj_out.bias"], before["proj_out.bias"] + 0.5 * head_b)
    assert sum(not torch.equal(after[k], v) for k, v in before.items()) == 3


def test_offload_with_loras_gives_the_same_video(tiny_folders, loras):
    settings = dict(prompt="a cat", height=HEIGHT, width=WIDTH, num_frames=9, num_inference_steps=2, seed=0)
    plain = skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32, loras=[(loras["wan"], 0.6)])
    offloaded = skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32, offload=True)
    offloaded.generate(**settings)  # a LoRA loaded after offloaded work still lands in the weights used
    offloaded.load_lora(loras["wan"], 0.6)
    assert np.array_equal(offloaded.generate(**settings), plain.generate(**settings))


# ----------------------------------------------------------------------------------------------------------------
# Bad LoRAs: one line naming the file and the first offending key, before any weight changes

GOOD = {"transformer.blocks.0.attn1.to_q.lora_A.weight": (4, 24),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": (24, 4)}
BAD_LORAS = {
    "key that matches no module": ({"transformer.blocks.0.attn1.to_z.lora_A.weight": (4, 24)}, "to_z"),
    "block the model lacks": ({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": (4, 24)}, "blocks.7"),
    "I2V LoRA on a T2V model": ({"lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": (4, 24)}, "k_img"),
    "LoRA for a wider model": ({"transformer.blocks.1.attn1.to_k.lora_A.weight": (4, 48),
                                "transformer.blocks.1.attn1.to_k.lora_B.weight": (48, 4)}, "to_k.lora_A"),
    "up and down of different ranks": ({"transformer.blocks.1.attn1.to_k.lora_A.weight": (4, 24),
                                        "transformer.blocks.1.attn1.to_k.lora_B.weight": (24, 8)}, "to_k.lora_B"),
    "down without up": ({"transformer.blocks.1.attn1.to_k.lora_A.weight": (4, 24)}, "to_k.lora_A"),
    "not a LoRA key": ({"transformer.blocks.1.attn1.to_k.weight": (24, 24)}, "to_k.weight"),
}


def bad_lora(tmp_path, case):
    shapes, needle = BAD_LORAS[case]
    path = str(tmp_path / "bad.safetensors")
    save_file({k: torch.randn(s) for k, s in {**GOOD, **shapes}.items()}, path)  # a good module comes first
    return path, needle


@pytest.mark.parametrize("case", list(BAD_LORAS))
def test_bad_lora_is_one_line_naming_file_and_key_and_changes_nothing(tiny_folders, tmp_path, case):
    path, needle = bad_lora(tmp_path, case)
    pipe = skyreels.load(tiny_folders["t2v"], device="cpu", dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(skyreels.CheckpointError) as e:
        pipe.load_lora(path)
    message = str(e.value)
    assert "\n" not in message and path in message and needle in message, message
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())
    assert pipe.lora_originals == {}


@pytest.mark.parametrize("case", ["key that matches no module", "LoRA for a wider model", "missing file"])
def test_bad_lora_on_the_command_line_is_one_error_line_and_no_output(tiny_folders, tmp_path, cli, case):
    path, needle = (str(tmp_path / "nope.safetensors"),) * 2 if case == "missing file" else bad_lora(tmp_path, case)
    run = cli(["t2v", "--model", tiny_folders["t2v"], "--prompt", "a cat", "--lora", f"{path}:0.5", "--height", "32",
               "--width", "48", "--steps", "1", "--num-frames", "5", "--out", tmp_path / "out.mp4"])
    assert run.code == 2
    err = run.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert sorted(os.listdir(tmp_path)) == (["bad.safetensors"] if case != "missing file" else [])


def test_command_line_loras_and_transformer_load_and_are_recorded_beside_the_video(tiny_folders, loras, tmp_path,
                                                                                    cli):
    folder = tiny_folders["t2v"]
    single = original_file(folder, tmp_path, "diffusion_model.")
    run = cli(["t2v", "--model", folder, "--prompt", "a cat", "--lora", loras["peft"], "--lora", f"{loras['wan']}:-0.5",
               "--transformer", single, "--height", "32", "--width", "48", "--steps", "1", "--num-frames", "5",
               "--seed", "0", "--out", tmp_path / "v.mp4"])
    assert run.code == 0, run.err
    settings = json.load(open(tmp_path / "v.json"))
    assert settings["loras"] == [[loras["peft"], 1.0], [loras["wan"], -0.5]] and settings["transformer"] == single


# ----------------------------------------------------------------------------------------------------------------
# Whole transformers in one file, in the original naming


def original_file(folder, tmp_path, prefix):
    """The folder's transformer as one file in the original Wan naming, keys under `prefix`."""
    state = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    path = str(tmp_path / f"original_{prefix.count('.')}.safetensors")
    save_file({prefix + skyreels.wan_name(k): v for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare keys", "model.diffusion_model. keys"])
def test_original_naming_file_loads_as_diffusers_from_single_file(tiny_folders, tmp_path, kind, prefix):
    """from_single_file knows no fps_projection / emb_pos names (see above) and cannot load the DF or first-last-frame
    DiTs, nor strip ComfyUI's bare diffusion_model. prefix: those are checked against the folder (next test)."""
    from diffusers import SkyReelsV2Transformer3DModel

    folder = tiny_folders[kind]
    path = original_file(folder, tmp_path, prefix)
    ref = SkyReelsV2Transformer3DModel.from_single_file(path, config=folder, subfolder="transformer",
                                                        torch_dtype=torch.float32).state_dict()
    ours = skyreels.load_component(model.DiT, model.DiTConfig, os.path.join(folder, "transformer"),
                                   single_file=path).state_dict()
    assert set(ref) == set(ours) and all(torch.equal(ours[k], ref[k]) for k in ref)


def folder_frames(pipe, kind):
    settings = dict(prompt="a cat", height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=2, seed=0)
    if kind == "flf2v":
        settings.update(image=image(0), last_image=image(1))
    return pipe.generate(**settings)


@pytest.fixture(scope="module")
def plain_frames(pipes):
    """{kind: frames}: the oracle of the next test, the folder's own pipeline's run, made once a folder."""
    return {kind: folder_frames(pipes[kind], kind) for kind in ("df", "flf2v")}


@pytest.mark.parametrize("kind", ["df", "flf2v"])
@pytest.mark.parametrize("prefix", ["diffusion_model.", ""], ids=["diffusion_model. keys", "bare keys"])
def test_original_naming_file_generates_the_folder_frames(tiny_folders, pipes, plain_frames, tmp_path, kind, prefix):
    folder = tiny_folders[kind]
    path = original_file(folder, tmp_path, prefix)
    pipe = skyreels.load(folder, device="cpu", dtype=torch.float32, transformer=path)
    plain = pipes[kind].transformer.state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in pipe.transformer.state_dict().items())
    # Equal weights; only float32 noise (~1e-7) from where the tensors sit in memory (alignment picks the kernel).
    assert max_abs(folder_frames(pipe, kind), plain_frames[kind]) <= 1e-5


def test_single_file_is_loaded_strictly(tiny_folders, tmp_path):
    folder = tiny_folders["t2v"]
    state = load_file(original_file(folder, tmp_path, "diffusion_model."))
    for change, needle in (("drop", "missing keys ['blocks.0.norm2.weight'"), ("extra", "unexpected keys")):
        bad = dict(state)
        if change == "drop":
            del bad["diffusion_model.blocks.0.norm3.weight"]
        else:
            bad["diffusion_model.blocks.0.self_attn.z.weight"] = torch.zeros(1)
        path = str(tmp_path / f"{change}.safetensors")
        save_file(bad, path)
        with pytest.raises(skyreels.CheckpointError) as e:
            skyreels.load(folder, device="cpu", dtype=torch.float32, transformer=path)
        assert path in str(e.value) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)
