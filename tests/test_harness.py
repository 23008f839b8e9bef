"""The tiny-checkpoint harness writes folders in the official -Diffusers layout."""
import json
import os


def test_folders_have_the_official_layout(tiny_folders):
    for kind, path in tiny_folders.items():
        index = json.load(open(os.path.join(path, "model_index.json")))
        expected = {"t2v": "SkyReelsV2Pipeline", "i2v": "SkyReelsV2ImageToVideoPipeline",
                    "flf2v": "SkyReelsV2ImageToVideoPipeline", "df": "SkyReelsV2DiffusionForcingPipeline"}[kind]
        assert index["_class_name"] == expected
        for sub in ("transformer", "vae", "text_encoder", "scheduler"):
            assert os.path.isfile(os.path.join(path, sub, "config.json")) or sub == "scheduler"
        assert os.path.isfile(os.path.join(path, "tokenizer", "spiece.model"))
        assert os.path.isfile(os.path.join(path, "text_encoder", "model.safetensors.index.json"))
        if kind in ("i2v", "flf2v"):
            assert os.path.isfile(os.path.join(path, "image_encoder", "config.json"))
            assert os.path.isfile(os.path.join(path, "image_processor", "preprocessor_config.json"))
