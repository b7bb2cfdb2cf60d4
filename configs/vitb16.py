"""ViT-B/16 CLIP with PSD at real scale (149,620,737 parameters, as open_clip's ViT-B-16).

    python -m softalign.main --config=configs/vitb16.py --workdir=gs://BUCKET/runs/vitb16 \\
        --config.data.path=/path/to/cc12m --config.tokenizer.path=/path/to/clip/tokenizer.json

Hyper-parameters follow the common CLIP recipe for a CC12M-sized dataset (open_clip / the CLIP paper):
  global batch 4096 (the PSD paper trains at a few thousand; CLIP used 32k), AdamW lr 5e-4 with betas (0.9, 0.98),
  eps 1e-6, weight decay 0.2 on matmul weights only, 2k warmup steps then cosine to 0, gradient clipping at 1.0,
  32 epochs of ~10M pairs = 78k steps. PSD: alpha_max 0.5 ramped linearly over the whole run, EMA teacher
  (momentum 0.999) on half of each batch, tau_d = 1 (the teacher keeps its own logit scale).
Fine-tuning from open_clip / OpenAI weights: --config.init_from=model.safetensors (see the README; OpenAI's own
weights also need --config.model.activation=quick_gelu).
Data: img2dataset webdataset shards (NNNNN.tar with key.jpg/key.txt) under data.path; any other source works
with --config.data.source=arrayrecord|folder|tfds.
"""

from softalign.config.schema import base_config
from softalign.models.presets import model_preset


def get_config(arch: str = "ViT-B/16"):
    c = base_config()
    c.model = model_preset(arch)  # CLIP's BPE: vocab 49408, context 77 (open_clip's shapes, so weights import)
    c.model.text.eot_id = -1  # from the tokenizer: 49407 with CLIP's BPE, and right for a BPE trained here too
    c.data.source = "webdataset"
    c.data.name = "cc12m"
    c.data.image_size = 224
    c.data.train_size = 10_000_000
    c.data.crop_scale = (0.9, 1.0)
    c.data.num_threads = 16
    c.tokenizer.path = ""  # CLIP's tokenizer.json: python -m softalign.interop.clip_bpe --output=clip_tokenizer.json
    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.num_steps = 78_000
    c.optim.update(lr=5e-4, warmup_steps=2000, min_lr_ratio=0.0, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6,
                   grad_clip=1.0)
    c.psd.update(alpha_max=0.5, ramp="linear", subset_fraction=0.5, teacher="ema", ema_momentum=0.999,
                 temperature=1.0)
    c.log_every = 100
    c.checkpoint_every = 2000
    c.evals = {}  # zero-shot / retrieval suites on real datasets come with the evaluation work
    return c
