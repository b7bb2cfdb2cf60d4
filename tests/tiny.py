"""A tiny config shared by the step and training tests (seconds to compile on 2 CPU cores)."""

from softalign.config.schema import base_config


def tiny_config(**overrides):
    c = base_config()
    m = c.model
    m.dtype = "float32"  # the exactness tests compare float32 runs; bfloat16 has its own tests
    m.embed_dim = 16
    m.vision.update(image_size=8, patch_size=4, width=32, depth=1, num_heads=2)
    m.text.update(context_length=24, width=32, depth=1, num_heads=2)
    c.data.update(image_size=8, train_size=400, heldout_size=64, num_threads=0, prefetch_buffer_size=1)
    c.tokenizer.num_captions = 2000
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_steps = 8
    c.optim.warmup_steps = 2
    c.log_every = 2
    c.checkpoint_every = 4
    c.psd.subset_groups = 8
    c.evals.color.num_examples = 64
    for key, value in overrides.items():
        target = c
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return c
