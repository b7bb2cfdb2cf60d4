"""The demo CLIP (+PSD, EMA teacher) on real photos: Flickr8k (6,091 train / 1,000 val images, 5 captions each),
converted to ArrayRecord, at 64 px with ViT patch 8. A few hundred steps on CPU; each step draws one of an
image's five captions.

    python -m softalign.data.convert --source=folder --input=../shared/data/flickr8k --output_dir=/tmp/f8k-ar
    python -m softalign.data.tokenizer --source=arrayrecord --path=/tmp/f8k-ar --vocab_size=2048 \\
        --output=/tmp/f8k-ar/tokenizer.json
    python -m softalign.main --config=configs/demo_flickr8k.py --workdir=/tmp/sa-f8k \\
        --config.data.path=/tmp/f8k-ar --config.tokenizer.path=/tmp/f8k-ar/tokenizer.json

The tokenizer step fits a byte-level BPE to the training captions (until the train loop trains one itself for
non-synthetic sources). The held-out evaluation is image<->text retrieval on the 1,000 val images (first caption).
"""

import ml_collections

from softalign.config.schema import base_config


def get_config():
    c = base_config()
    c.model.vision.image_size = 64
    c.model.vision.patch_size = 8
    c.model.text.context_length = 32        # 99.6% of Flickr8k captions fit in 32 tokens with start/end
    c.data.source = "arrayrecord"
    c.data.path = ""                        # the converter's output folder (required)
    c.data.train_split = "train"
    c.data.heldout_split = "val"
    c.data.image_size = 64
    c.data.crop_scale = (0.5, 1.0)          # 6k photos: stronger crops than the synthetic demo
    c.tokenizer.vocab_size = 2048
    c.batch_size = 128
    c.num_steps = 400
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 40
    c.optim.weight_decay = 0.1
    c.log_every = 25
    c.checkpoint_every = 100
    c.evals = ml_collections.ConfigDict(dict(heldout=dict(kind="retrieval", split="heldout", every=0)))
    return c
