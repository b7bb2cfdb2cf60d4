"""Named model configs (the `model` config section) so experiment configs pick an architecture by name.

ViT-B/16, ViT-B/32 and ViT-S/16 match open_clip's ViT-B-16, ViT-B-32 and ViT-S-16 (non-quickgelu) exactly,
so parameter counts, and later imported weights, line up. open_clip has no ViT-Ti; ours pairs a DeiT-Ti image
tower (192 wide, 12 deep, 3 heads) with a 256-wide, 12-deep, 4-head text tower and a 192-d joint space.
'demo' is a tiny model for CPU tests and smoke runs. The text eot_id is the CLIP BPE's <|endoftext|> (49407);
with another tokenizer, set `model.text.eot_id` / `vocab_size` from it.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

CLIP_VOCAB = 49408
CLIP_EOT = 49407


def _make(
    *,
    embed_dim: int,
    image_size: int,
    patch_size: int,
    vision: tuple[int, int, int],
    text: tuple[int, int, int],
    vocab_size: int = CLIP_VOCAB,
    context_length: int = 77,
    eot_id: int = CLIP_EOT,
) -> ml_collections.ConfigDict:
    """Assemble a full model section; `vision`/`text` are (width, depth, num_heads)."""
    cfg = ml_collections.ConfigDict()
    cfg.embed_dim = embed_dim
    cfg.activation = "gelu"
    # Matmul inputs: 'auto' is bfloat16 (products accumulated in float32; params, LayerNorm, softmax stay float32)
    # on TPU, GPU and CPUs with AVX512-BF16/AMX/ARM BF16, where it runs at twice the float32 rate, and float32 on
    # CPUs without bf16 instructions, where bf16 is emulated and slower (softalign/models/precision.py,
    # docs/performance.md). 'float32' for exact comparisons, e.g. with open_clip's float32 outputs.
    cfg.dtype = "auto"
    cfg.logit_scale_init = 1.0 / 0.07
    cfg.logit_scale_max = 100.0
    cfg.remat = False
    cfg.scan_layers = False  # nn.scan over each tower's blocks (stacked params; compile time independent of depth)

    cfg.vision = ml_collections.ConfigDict()
    cfg.vision.image_size = image_size
    cfg.vision.patch_size = patch_size
    cfg.vision.width, cfg.vision.depth, cfg.vision.num_heads = vision
    cfg.vision.mlp_ratio = 4.0
    cfg.vision.pool = "cls"
    # FLIP (docs/method.md): share of image patches the student drops at random in training; 0: none. Never at
    # evaluation, and teachers always embed the full image.
    cfg.vision.mask_ratio = 0.0
    # FLIP's unmasked tuning ('random' mask only): the last unmask_last_steps steps of the run see every patch.
    cfg.vision.unmask_last_steps = 0
    # 'random' (FLIP) | 'attentive' (A-CLIP: keep the patches the EMA/snapshot teacher's [cls] attends to most)
    cfg.vision.mask = "random"
    # 'attentive' only: keep whole mask_block x mask_block blocks of patches, ranked by their mean attention (A-CLIP
    # ranks 2 x 2 blocks of its 14 x 14 grid); 1: single patches. Must divide the patch grid.
    cfg.vision.mask_block = 1

    cfg.text = ml_collections.ConfigDict()
    cfg.text.vocab_size = vocab_size
    cfg.text.context_length = context_length
    cfg.text.width, cfg.text.depth, cfg.text.num_heads = text
    cfg.text.mlp_ratio = 4.0
    cfg.text.eot_id = eot_id
    return cfg


_PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "ViT-Ti/16": lambda: _make(
        embed_dim=192, image_size=224, patch_size=16, vision=(192, 12, 3), text=(256, 12, 4)
    ),
    "ViT-S/16": lambda: _make(
        embed_dim=384, image_size=224, patch_size=16, vision=(384, 12, 6), text=(384, 12, 6)
    ),
    "ViT-B/16": lambda: _make(
        embed_dim=512, image_size=224, patch_size=16, vision=(768, 12, 12), text=(512, 12, 8)
    ),
    "ViT-B/32": lambda: _make(
        embed_dim=512, image_size=224, patch_size=32, vision=(768, 12, 12), text=(512, 12, 8)
    ),
    "demo": lambda: _make(
        embed_dim=128,
        image_size=32,
        patch_size=4,
        vision=(128, 3, 4),
        text=(128, 3, 4),
        vocab_size=1024,
        context_length=24,
        eot_id=1023,
    ),
}


def list_presets() -> list[str]:
    """Names accepted by `model_preset`."""
    return list(_PRESETS)


def model_preset(name: str) -> ml_collections.ConfigDict:
    """A fresh, mutable model config for `name` (e.g. 'ViT-B/16'); raises ValueError for unknown names."""
    if name not in _PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; available: {list_presets()}.")
    return _PRESETS[name]()
