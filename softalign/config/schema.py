"""The full config schema with defaults; every file in configs/ starts from ``base_config()`` and overrides.

Keeping every key here means ``--config.x=y`` on the command line can set any of them, and an unknown key is an
error rather than a silently ignored typo.
"""

from __future__ import annotations

import ml_collections

from softalign.data.pipeline import default_data_config
from softalign.models.presets import model_preset


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the demo model on the synthetic data, PSD with an EMA teacher."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_preset("demo")
    c.model.text.vocab_size = -1  # -1: take vocab_size and eot_id from the tokenizer
    c.model.text.eot_id = -1
    # text.kind 'precomputed' (FLAME / LiT; docs/method.md): no text transformer; an MLP (projector_hidden wide, 0: one
    # linear layer, after a LayerNorm) maps each record's data.text_embedding_shape = (K, input_dim) precomputed
    # embeddings into the joint space. K > 1 needs objective.name='multi_positive_sigmoid'.
    c.model.text.kind = "transformer"
    c.model.text.input_dim = 0
    c.model.text.projector_hidden = 512
    c.data = default_data_config()
    c.data.name = ""  # dataset name for real sources (e.g. 'cc12m'); the synthetic source ignores it
    c.data.path = ""  # where a real source's files are (shards, folder, TFDS data_dir)
    # subset_file: a .npy of train-split record numbers to train on (python -m softalign.tools.reduce writes one);
    # batch['index'] then numbers the records 0..len-1 in the file's order. Applied before train_fraction.
    c.data.subset_file = ""
    # tokenizer.path: a tokenizer.json (e.g. CLIP's own). Empty: train a BPE on the source's captions and keep it in
    # the workdir, so a resumed run uses the same vocabulary.
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=1024, num_captions=20_000))
    # init_from: fine-tune from these weights: an open_clip / OpenAI CLIP checkpoint (.safetensors, .pt, .bin) or
    # softalign params (.msgpack from python -m softalign.convert). Used when the workdir has no checkpoint yet (a
    # resumed run continues from its own); the model config must match it (softalign/convert.py checks every shape).
    c.init_from = ""

    c.batch_size = 128  # global
    c.eval_batch_size = 256
    c.num_steps = 1000
    c.stop_at_step = -1  # >0: end this process at that step (train in slices; the schedule still spans num_steps)
    c.num_devices = -1  # devices to use; -1: all. The global batch is split over all of them.
    c.fsdp = 1  # >1: shard parameters and optimizer state over this many devices (mesh axis 'fsdp')
    c.fsdp_min_size = 2**14  # leaves smaller than this stay replicated
    c.sharding_rules = ()  # ((path_regex, (axis_or_None, ...)), ...): explicit PartitionSpecs, checked first
    c.grad_accum_steps = 1  # >1: exact cached-feature accumulation over that many micro-batches per step
    c.loss_chunk_size = 0  # >0: tile the loss's B columns in chunks (O(b*c) memory per device, same gradients)
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=100, min_lr_ratio=0.0, weight_decay=0.2, b1=0.9, b2=0.98, eps=1e-6, grad_clip=1.0))
    c.optim.freeze = ()  # towers to lock (LiT): ("vision",) or ("text",); their params never change

    # The loss on the embeddings (softalign/objectives/registry.py). 'infonce': CLIP's symmetric InfoNCE, with
    # PSD's soft targets below when psd.alpha_max > 0.
    c.objective = ml_collections.ConfigDict(dict(name="infonce"))
    # siglip: the initial bias b of its logits s*u.v + b (a learnable leaf, params["objective"]["bias"]); SigLIP's -10
    # keeps the initial loss small with B-1 negatives per image. Pair it with model.logit_scale_init=10 (its t').
    c.objective.siglip_bias_init = -10.0
    # infonce, synthetic source only: every pair the ground truth says is true is a positive (uniform hard target
    # over them) instead of the batch's own pair alone: "knowing the false negatives", without soft targets.
    c.objective.multi_positive = False
    # protoclip (docs/method.md): InfoNCE + proto_weight x the prototype loss. num_prototypes k-means clusters of the
    # memory bank (needs psd.teacher='memory'; a multiple of the data shards), re-clustered every episode_steps;
    # proto_temperature divides the teacher's centroid similarities (ProtoCLIP's 0.01); proto_scale_init: the
    # initial value of its own learnable logit scale s_p (params["objective"]["proto_logit_scale"] = log s_p).
    c.objective.num_prototypes = 64
    c.objective.episode_steps = 100
    c.objective.proto_weight = 1.0
    c.objective.proto_temperature = 0.01
    c.objective.proto_scale_init = 1.0 / 0.07
    # objective.name='distill': TinyCLIP's affinity mimicking from a frozen teacher (softalign/objectives/distill.py).
    # teacher: a finished run's workdir or an open_clip/OpenAI weight file; teacher_config: a preset name for it
    # (empty: its config.json, or inferred from the weights); alpha: TinyCLIP's distillation_alpha, the soft term's
    # weight (1: pure mimicking; 1 - alpha goes to InfoNCE); temperature divides the teacher logits; inherit: start
    # from the teacher's (or inherit_from's) weights cut to the student's size (softalign/models/inherit.py).
    c.distill = ml_collections.ConfigDict(dict(teacher="", teacher_config="", alpha=1.0, temperature=1.0,
                                               inherit=False, inherit_from="", inherit_config=""))

    # PSD (docs/method.md). alpha_max=0 is plain CLIP InfoNCE. Defaults per the Flickr8k study (docs/results.md): the
    # EMA teacher was the best teacher at 50% caption noise (ahead of CLIP on i2t R@5 in 3 of 3 seeds, by ~1
    # std), and no alpha_max / rho / ramp / momentum setting tried beat these, so they stay at docs/method.md's values.
    c.psd = ml_collections.ConfigDict(dict(
        alpha_max=0.5,
        ramp="linear",  # linear | cosine | constant
        ramp_start=0,
        ramp_end=-1,  # -1: num_steps
        subset_fraction=0.5,  # rho
        subset_groups=0,  # strata of S; 0: from the batch size alone (soft_targets.resolve_groups), never the mesh
        # self | ema | snapshot | memory | oracle (synthetic only: the exact ground truth). ema costs a forward on
        # rho*B rows (~1.15x the CLIP step); memory (PS-KD's per-sample store) adds no forward pass (1.00x the
        # FLOPs) but trailed ema at ~2 epochs in 3 of 3 seeds of the synthetic truth cell (t2i R@5, colour; ahead at
        # 19 epochs; docs/results.md), so ema stays the default; memory is the free choice for many-epoch data.
        teacher="ema",
        temperature=1.0,  # tau_d: divides the teacher logits (teacher keeps its own logit scale)
        ema_momentum=0.99,
        snapshot_every=1000,
        # memory teacher: storage dtype of its host bank of per-record embeddings (float32 | float16 | bfloat16).
        # Host RAM per process: train records x (2 x embed_dim x itemsize + 4) bytes, e.g. 23 GiB for CC12M at
        # D=512 in float16; twice that briefly while a checkpoint is saved.
        memory_dtype="float32",
    ))
    # A-CLIP's recipe around its attentive mask (model.vision.mask='attentive'; docs/method.md, "A-CLIP"). The
    # defaults give the mask alone; A-CLIP's full recipe is views=2, simclr_weight=1, byol_weight=2 (its own values
    # for the rest), as configs/aclip_demo.py sets. views=2: two random resized crops (crop_scale of the area,
    # aspect in crop_ratio) of each image, each masked by the teacher's attention on the full image read through its
    # crop; the objective is averaged over them. simclr_weight: SimCLR at simclr_temperature on a 3-layer head;
    # simclr_pairs 'views' contrasts view 1 with view 2, 'reference' view 1 with itself, as the released code does.
    # byol_weight: BYOL's 2 - 2 cos(pred(proj(student)), proj_ema(teacher on the full image)). head_hidden/head_dim:
    # the heads' widths (A-CLIP: 4096 and 256).
    c.aclip = ml_collections.ConfigDict(dict(
        views=1, crop_scale=(0.5, 1.0), crop_ratio=(3.0 / 4.0, 4.0 / 3.0), simclr_weight=0.0,
        simclr_temperature=0.1, simclr_pairs="views", byol_weight=0.0, head_hidden=4096, head_dim=256))

    # lit.embeddings_from: a finished run's workdir whose (frozen) text tower embeds the synthetic source's captions
    # into an ArrayRecord dataset with text_embedding (softalign/training/lit.py), which this run then trains on;
    # data.path, data.text_embedding_shape and model.text.input_dim are filled in. lit.data_dir: where that dataset
    # goes (empty: <workdir>/lit_data); an existing one made from the same run and sizes is reused.
    c.lit = ml_collections.ConfigDict(dict(embeddings_from="", data_dir=""))

    c.log_every = 50
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.evals = ml_collections.ConfigDict(dict(
        heldout=dict(kind="retrieval", split="heldout", every=0),
        color=dict(kind="synthetic_zeroshot", attribute="color", every=0),
        shape=dict(kind="synthetic_zeroshot", attribute="shape", every=0),
    ))
    return c


def demo_config() -> ml_collections.ConfigDict:
    """The demo: the ~1.4M-parameter model on 32 px synthetic scenes, about 3 minutes on 2 CPU cores."""
    c = base_config()
    c.model.vision.patch_size = 8  # 4x4 patches: half the step time of patch 4, and the same accuracy per step
    c.model.text.context_length = 40  # the longest synthetic caption is 34 tokens with start/end
    c.data.image_size = 32
    c.data.train_size = 100_000
    c.batch_size = 128
    c.num_steps = 300
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.1
    c.log_every = 50
    c.checkpoint_every = 100
    # The synthetic scenes' exact ground truth (softalign/evaluation/ground_truth.py; synthetic source only):
    # many-to-many retrieval and the compositional probe, about 7 s and 6 s at the end of the run on 2 CPU cores.
    c.evals.truth = dict(kind="multi_positive_retrieval", split="heldout", every=0)
    c.evals.probe = dict(kind="compositional_probe", split="heldout", num_examples=500, every=0)
    return c
