"""SkyReels-V2: checkpoint loading and the generation loops.

Loading is name alignment: our modules use the official parameter names, so a component is built on the meta
device (no memory), and each tensor is read from its safetensors shard, cast and placed as it is read, and
assigned in place. A 28 GB bf16 transformer therefore never exists twice in memory.
"""
import json
import os

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(Exception):
    """A checkpoint that cannot be used. The message is one line and names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loading


def read_json(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def weight_files(folder):
    """{tensor name: shard path} for a component folder: a sharded index, or a single safetensors file."""
    for name in ("diffusion_pytorch_model", "model"):
        index = os.path.join(folder, f"{name}.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            return {k: os.path.join(folder, v) for k, v in weight_map.items()}
        single = os.path.join(folder, f"{name}.safetensors")
        if os.path.isfile(single):
            with _open(single) as f:
                return {k: single for k in f.keys()}
    raise CheckpointError(f"no safetensors weights in {folder} (looked for *.safetensors and its index)")


def _open(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"missing weight file: {path}")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt or incomplete safetensors file: {path} ({e})") from None


def load_weights(module, folder, dtype=torch.float32, device="cpu"):
    """Fill `module` (built on the meta device, or anywhere) from `folder`'s safetensors, strictly.

    A module may declare, as class attributes:
      checkpoint_aliases  {checkpoint key: our key}, used only where our key is not in the checkpoint
                          (UMT5 checkpoints tie shared.weight and encoder.embed_tokens.weight either way);
      ignored_keys        checkpoint keys that are known and unused (e.g. CLIP layers past the penultimate);
      keep_fp32           substrings of parameter names kept in float32 whatever `dtype` is, as the reference
                          keeps them (norms, modulation, time embedding).
    """
    files = weight_files(folder)
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    aliases = getattr(module, "checkpoint_aliases", {})
    ignored = set(getattr(module, "ignored_keys", ()))
    keep_fp32 = getattr(module, "keep_fp32", ())
    plan = {}  # our key -> checkpoint key
    for key in files:
        ours = aliases.get(key, key)
        if ours in expected and (ours not in plan or key == ours):
            plan[ours] = key
    missing = sorted(set(expected) - set(plan))
    unexpected = sorted(k for k in files if aliases.get(k, k) not in expected and k not in ignored
                        and not any(k.startswith(p) for p in ignored if p.endswith(".")))
    if missing or unexpected:
        what = (f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "") + \
               ("; " if missing and unexpected else "") + \
               (f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
        raise CheckpointError(f"{folder} does not fit {type(module).__name__} from its config.json: {what}")
    by_file = {}
    for ours, key in plan.items():
        by_file.setdefault(files[key], []).append((ours, key))
    for path, pairs in sorted(by_file.items()):
        state = {}
        with _open(path) as f:
            present = set(f.keys())
            for ours, key in pairs:
                if key not in present:
                    raise CheckpointError(f"{path} lacks {key}, which its index promises")
                try:
                    t = f.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"corrupt or incomplete safetensors file: {path} ({e})") from None
                if tuple(t.shape) != tuple(expected[ours].shape):
                    raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, but config.json implies "
                                          f"{tuple(expected[ours].shape)}")
                to = torch.float32 if any(s in ours for s in keep_fp32) else dtype
                state[ours] = t.to(device=device, dtype=to if t.is_floating_point() else t.dtype)
        module.load_state_dict(state, strict=False, assign=True)
    return module
