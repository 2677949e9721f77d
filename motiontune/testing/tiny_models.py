"""Tiny random models of the real architectures, saved as complete diffusers pipeline folders.

Tests, the demo and the benchmarks load these through the same code path as real weights, so the
loading code is exercised for real. Every weight is random (seeded); nothing is downloaded. Each family
declares its own recipes (`tiny_pipeline` in its models/ file); this module runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from ..models.registry import tiny_family, tiny_models

FAMILIES = tiny_models()

# Word-level vocabulary: enough words for the demo captions and test prompts; others map to <unk>.
_WORDS = (
    "a the an of and in on with at to from is are video clip film shot scene man woman person people "
    "dog cat bird car street city sky sea water tree forest room light dark black white red green blue "
    "yellow orange purple grey gray moving moves walks walking runs running dances dancing shape shapes "
    "circle square triangle ball old silent comedy slow fast camera pan zoom close up wide view rabbit "
    "pig pigs cartoon animation test pattern bars colour color motion style"
).split()


def build_tokenizer(directory: Path, model_max_length: int = 512, padding_side: str = "right") -> None:
    """A UMT5-style tokenizer (pad=0, eos=1, unk=2, `</s>` appended) built with `tokenizers`; `padding_side` saved
    with it, as a real model's tokenizer config says it."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side=padding_side,
    )
    fast.save_pretrained(directory)


def demo_clip_pixels() -> list[torch.Tensor]:
    """The bundled demo clips as pixels in [-1, 1], (1, 3, 9, 64, 64) each: 9 frames 1/8 s apart."""
    from ..data.video import decode_frames

    clips = sorted((Path(__file__).parent.parent / "demo" / "clips").glob("*.mp4"))
    frames = [decode_frames(clip, [i / 8 for i in range(9)], (64, 64)) for clip in clips]
    return [torch.from_numpy(f).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0 for f in frames]


def make_tiny_model(family: str, out_dir: str | Path, seed: int = 0, heads: int | None = None, layers: int = 2) -> Path:
    """Write the tiny random model `family` (one of FAMILIES) as a diffusers folder its stock pipeline loads."""
    from transformers import AutoTokenizer

    recipe = tiny_family(family)  # a ValueError listing FAMILIES for an unknown name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def tokenizer(subfolder: str, max_length: int, padding_side: str = "right"):
        build_tokenizer(out / subfolder, model_max_length=max_length, padding_side=padding_side)
        return AutoTokenizer.from_pretrained(out / subfolder)

    torch.manual_seed(seed)
    recipe.tiny_pipeline(family, tokenizer, demo_clip_pixels(), heads=heads, layers=layers).save_pretrained(out)
    (out / "motiontune_tiny.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    return out
