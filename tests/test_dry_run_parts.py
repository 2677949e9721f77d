"""The dry run's stand-ins for a model's parts (motiontune/check/parts.py) are the parts a run loads: an image-to-video
family's image processor makes as many patches as its image encoder has positions, at the released size and on a
tiny model's folder. (The full-size dry run of `#hunyuan video 1.5 I2V LoRA` stopped encoding the first frame: SigLIP's
processor at its class default, 224, made 256 patches for the 384 model's 729 positions.)"""

from __future__ import annotations

import numpy as np
import pytest

from motiontune.check.parts import PartBuilder
from motiontune.configure import load_config


def patches_and_positions(builder, encoder_class, processor_class, base) -> tuple[int, int]:
    processor = builder(processor_class, base, "feature_extractor", None)
    pixels = processor.preprocess(images=np.zeros((480, 832, 3), np.uint8), return_tensors="pt").pixel_values
    cfg = builder._module(encoder_class, "image_encoder").config  # on the meta device: no weights
    return (pixels.shape[-2] // cfg.patch_size) * (pixels.shape[-1] // cfg.patch_size), (cfg.image_size // cfg.patch_size) ** 2


@pytest.mark.parametrize("preset", ["#hunyuan video 1.5 I2V LoRA", "#wan 2.2 I2V LoRA", "tiny HunyuanVideo 1.5 I2V"])
def test_the_image_processor_makes_the_patches_the_image_encoder_takes(preset, tiny_models):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel, SiglipImageProcessor, SiglipVisionModel

    tiny = preset.startswith("tiny")
    config = load_config("#hunyuan video 1.5 I2V LoRA" if tiny else preset)
    if tiny:
        config = config.model_copy(update={"base_model_name": str(tiny_models("hunyuan-video-1.5-i2v"))})
    classes = (CLIPVisionModel, CLIPImageProcessor) if "wan" in preset else (SiglipVisionModel, SiglipImageProcessor)
    builder = PartBuilder(config, mode=None, named=lambda *_: None)
    with torch.device("meta"):
        patches, positions = patches_and_positions(builder, *classes, config.base_model_name)
    print(f"{preset}: {patches} patches, {positions} positions")
    assert patches == positions
    if not tiny:
        assert positions == (256 if "wan" in preset else 729)  # CLIP ViT-H/14 at 224, SigLIP at 384
