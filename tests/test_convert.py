"""open_clip / OpenAI CLIP interop: weight import/export against real open_clip models, tokenizer parity, and
fine-tuning through ``config.init_from``. Skipped without torch/open_clip (pip install -r requirements-interop.txt).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch: pip install -r requirements-interop.txt")
open_clip = pytest.importorskip("open_clip", reason="interop tests need open_clip_torch: "
                                "pip install -r requirements-interop.txt")
import safetensors.torch  # noqa: E402  (an open_clip dependency)
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from tiny import tiny_config  # noqa: E402

from softalign.cli import convert as convert_cli  # noqa: E402
from softalign.config.errors import ConfigError  # noqa: E402
from softalign.data.tokenizer import Tokenizer  # noqa: E402
from softalign.interop import weight_files, weights  # noqa: E402
from softalign.interop.clip_bpe import build_clip_tokenizer  # noqa: E402
from softalign.models import CLIP, build_model, model_preset  # noqa: E402
from softalign.training import train  # noqa: E402

MAX_REL_ERR = 1e-4
# A small CLIP with different tower widths, so a swapped transpose or tower cannot go unnoticed.
TINY = dict(embed_dim=24, image_size=32, patch_size=8, vision=(64, 2, 2), text=(48, 2, 2), vocab=100, context=16)


def tiny_open_clip(quick_gelu: bool = False, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised open_clip CLIP of the TINY shape (nothing downloaded), every parameter randomized."""
    t = {**TINY, **overrides}
    (vw, vd, vh), (tw, td, th) = t["vision"], t["text"]
    model = open_clip.model.CLIP(
        t["embed_dim"], vision_cfg=CLIPVisionCfg(layers=vd, width=vw, head_width=vw // vh, patch_size=t["patch_size"],
                                                 image_size=t["image_size"]),
        text_cfg=CLIPTextCfg(context_length=t["context"], vocab_size=t["vocab"], width=tw, heads=th, layers=td),
        quick_gelu=quick_gelu)
    return randomize(model.eval(), seed)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, LayerNorm scales and biases included (open_clip inits those to 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(generator=gen)
            if p.ndim == 0:
                p.mul_(0.5).add_(2.0)
            elif name.endswith(("proj", "text_projection")):
                p.mul_(p.shape[0] ** -0.5)
            elif p.ndim >= 2 and "embedding" not in name:
                p.mul_(float(np.prod(p.shape[1:])) ** -0.5)
            elif name.endswith("weight") and p.ndim == 1:
                p.mul_(0.2).add_(1.0)
            else:  # biases, class / positional / token embeddings
                p.mul_(0.3)
    return model


def softalign_config(name: str | None = None, activation: str = "gelu", **overrides):
    """The softalign model section for TINY (or for preset `name`)."""
    if name:
        cfg = model_preset(name)
    else:
        t = {**TINY, **overrides}
        cfg = model_preset("demo")
        cfg.embed_dim = t["embed_dim"]
        cfg.vision.update(image_size=t["image_size"], patch_size=t["patch_size"])
        (cfg.vision.width, cfg.vision.depth, cfg.vision.num_heads), (cfg.text.width, cfg.text.depth,
                                                                      cfg.text.num_heads) = t["vision"], t["text"]
        cfg.text.update(vocab_size=t["vocab"], context_length=t["context"], eot_id=t["vocab"] - 1)
    cfg.activation = activation
    cfg.dtype = "float32"  # exact comparison with open_clip's float32 forward (the default computes in bfloat16)
    return cfg


def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (sharing the model's memory)."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def random_inputs(cfg, n: int = 3, seed: int = 1):
    """NCHW float images and token rows [sot, words..., eot (the largest id), 0-padding] of varied lengths."""
    rng = np.random.default_rng(seed)
    size, length, eot = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size - 1
    images = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    tokens = np.zeros((n, length), np.int64)
    for row, end in enumerate(np.linspace(2, length - 1, n).astype(int)):
        tokens[row, :end] = rng.integers(1, eot, end)
        tokens[row, end] = eot
    return images, tokens


def max_rel_err(ours, ref) -> float:
    """max over rows of |ours - ref| / |ref| (L2 norms)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)))


def compare(oc_model, params, cfg, n: int = 3) -> tuple[float, float]:
    """Relative errors (image, text) of softalign's normalised embeddings against open_clip's."""
    images, tokens = random_inputs(cfg, n)
    with torch.no_grad():
        ref_img = oc_model.encode_image(torch.from_numpy(images), normalize=True).numpy()
        ref_txt = oc_model.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
    model = build_model(cfg)
    variables = {"params": jax.tree.map(jnp.asarray, params)}
    encode = jax.jit(lambda v, x, y: (model.apply(v, x, method=CLIP.encode_image),
                                      model.apply(v, y, method=CLIP.encode_text)))
    img, txt = encode(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(tokens, jnp.int32))
    return max_rel_err(img, ref_img), max_rel_err(txt, ref_txt)


@pytest.mark.parametrize("activation,suffix", [("gelu", ".safetensors"), ("quick_gelu", ".pt")])
def test_tiny_forward_matches_open_clip(tmp_path, activation, suffix):
    oc = tiny_open_clip(quick_gelu=activation == "quick_gelu")
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".safetensors":
        safetensors.torch.save_file(oc.state_dict(), path)
    else:
        torch.save(oc.state_dict(), path)
    cfg = softalign_config(activation=activation)
    params = weights.load_pretrained(path, cfg)
    errors = compare(oc, params, cfg)
    print(f"tiny {activation} via {suffix}: max relative error image {errors[0]:.2e}, text {errors[1]:.2e}")
    assert max(errors) <= MAX_REL_ERR, errors
    if activation == "quick_gelu":  # the activation is visible in the outputs: the config must name the right one
        assert min(compare(oc, params, softalign_config(activation="gelu"))) > 10 * MAX_REL_ERR


def test_round_trip_is_exact_and_loads_into_open_clip(tmp_path):
    oc = tiny_open_clip(seed=3)
    sd = state_dict(oc)
    cfg = softalign_config()
    params = weights.state_dict_to_params(sd, cfg)
    back = weights.params_to_state_dict(params)
    assert set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    again = weights.state_dict_to_params(back, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    # The export is a state dict open_clip itself loads (strict: every key, no extra ones).
    weight_files.save_state_dict(back, str(tmp_path / "export.safetensors"))
    fresh = tiny_open_clip(seed=9)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in
                           weight_files.load_state_dict(str(tmp_path / "export.safetensors")).items()}, strict=True)
    images, tokens = random_inputs(cfg)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh.encode_text(torch.from_numpy(tokens)).numpy(),
                                      oc.encode_text(torch.from_numpy(tokens)).numpy())


def test_scan_layers_stack_and_unstack():
    oc = tiny_open_clip(seed=4)
    cfg = softalign_config()
    cfg.scan_layers = True
    params = weights.state_dict_to_params(state_dict(oc), cfg)
    assert params["vision"]["transformer"]["resblocks"]["block"]["ln_1"]["scale"].shape == (2, 64)
    assert max(compare(oc, params, cfg)) <= MAX_REL_ERR
    for key, value in weights.params_to_state_dict(params).items():
        np.testing.assert_array_equal(value, state_dict(oc)[key], err_msg=key)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_checkpoint_wrappers_and_torchscript(tmp_path):
    oc = tiny_open_clip(seed=5)
    sd = state_dict(oc)
    wrapped = str(tmp_path / "epoch_1.pt")  # an open_clip training checkpoint, saved from DDP
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}, wrapped)
    loaded = weight_files.load_state_dict(wrapped)
    assert set(loaded) == set(sd) and all(np.array_equal(loaded[k], sd[k]) for k in sd)
    half = str(tmp_path / "bf16.safetensors")  # numpy has no bfloat16: the reader falls back to ml_dtypes
    safetensors.torch.save_file({k: v.bfloat16() for k, v in oc.state_dict().items()}, half)
    loaded = weight_files.load_state_dict(half)
    assert loaded["visual.proj"].dtype == np.float32
    np.testing.assert_array_equal(loaded["visual.proj"], oc.visual.proj.detach().bfloat16().float().numpy())
    images, tokens = random_inputs(softalign_config(), n=1)
    jit = str(tmp_path / "openai_jit.pt")  # OpenAI ships TorchScript archives
    torch.jit.trace(oc, (torch.from_numpy(images), torch.from_numpy(tokens)), check_trace=False).save(jit)
    loaded = weight_files.load_state_dict(jit)
    loaded["attn_mask"] = np.zeros((16, 16), np.float32)  # non-parameter buffers are ignored explicitly
    params = weights.state_dict_to_params(loaded, softalign_config())
    np.testing.assert_array_equal(params["text"]["proj"]["kernel"], sd["text_projection"])


def test_vitb32_mapping_and_config_errors():
    sd = state_dict(open_clip.create_model("ViT-B-32", pretrained=None))  # random init; nothing downloaded
    inferred = weights.infer_model_config(sd)
    assert weights.describe(inferred) == "ViT-B/32" and inferred.text.eot_id == 49407
    assert inferred.embed_dim == 512
    assert inferred.vision.to_dict() == model_preset("ViT-B/32").vision.to_dict()
    assert inferred.text.to_dict() == model_preset("ViT-B/32").text.to_dict()
    params = weights.state_dict_to_params(sd, model_preset("ViT-B/32"))  # every shape checked against the model
    np.testing.assert_array_equal(params["vision"]["patch_embed"]["kernel"][3, 5, 1],
                                  sd["visual.conv1.weight"][:, 1, 3, 5])
    with pytest.raises(ValueError, match=r"checkpoint is ViT-B/32 \(patch 32\) but model.vision.patch_size=16"):
        weights.state_dict_to_params(sd, model_preset("ViT-B/16"))
    bad = dict(sd, **{"visual.transformer.resblocks.3.ln_1.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match=r"visual.transformer.resblocks.3.ln_1.bias -> "
                                         r"vision/transformer/resblocks_3/ln_1/bias: shape \(7,\)"):
        weights.state_dict_to_params(bad, model_preset("ViT-B/32"))
    extra = dict(sd, logit_bias=np.zeros((), np.float32))
    extra.pop("ln_final.bias")
    with pytest.raises(ValueError, match=r"missing \[ln_final.bias\]; unused \[logit_bias\]"):
        weights.state_dict_to_params(extra, model_preset("ViT-B/32"))


def test_vitb16_mapping_and_forward():
    oc = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    weights.state_dict_to_params(state_dict(oc), model_preset("ViT-B/16"))  # all 12 + 12 blocks, shapes checked
    # The forward at B/16's real widths, heads, 224 px, patch 16 and vocabulary, with 2 blocks per tower (the other
    # blocks are the same code and mapping; a full-depth CPU compile would dominate this file's time).
    oc.visual.transformer.resblocks = oc.visual.transformer.resblocks[:2]
    oc.transformer.resblocks = oc.transformer.resblocks[:2]
    randomize(oc, seed=8)
    cfg = model_preset("ViT-B/16")
    cfg.vision.depth = cfg.text.depth = 2
    cfg.scan_layers = True  # and through the stacked layout
    cfg.dtype = "float32"
    params = weights.state_dict_to_params(state_dict(oc), cfg)
    errors = compare(oc, params, cfg, n=2)
    print(f"ViT-B/16 (2 blocks per tower): max relative error image {errors[0]:.2e}, text {errors[1]:.2e}")
    assert max(errors) <= MAX_REL_ERR, errors


CAPTIONS = [
    "a photo of a cat", "A Photo Of A DOG!!", "Don't stop: it's the dog's toy; they're here, we've gone, I'm, you'll",
    "123 apples, 4.5 kg and 1,000,000 stars in 2024-01-01", "café au lait, naïve résumé, CAFÉ, Ünïcödé Straße",
    "  multiple   spaces\tand\nnewlines  ", "email@example.com #hashtag $5.99 50% off (brackets) [x] {y}",
    "日本語のテキスト and 中文", "emoji 😀🎉!", "Tom &amp; Jerry &lt;3 &quot;quoted&quot; it&#39;s",
    "curly ‘single’ and “double” quotes", "non\u00a0breaking space", "control\x00chars\x1f removed",
    "", "...", "a very long caption " * 30, "x" * 400, "hyphen-ated under_score slash/back\\slash",
]


def test_clip_tokenizer_matches_open_clip(tmp_path):
    path = str(tmp_path / "clip_tokenizer.json")
    build_clip_tokenizer().save(path)
    tok = Tokenizer.from_file(path, 77)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)
    ours, ref = tok.encode_batch(CAPTIONS), open_clip.tokenize(CAPTIONS).numpy()
    for text, a, b in zip(CAPTIONS, ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=repr(text))
    assert ref[-2, -1] == 49407 and tok.decode(ours[0]) == "a photo of a cat"


def test_init_from_starts_from_the_imported_weights(tmp_path):
    c = tiny_config()
    v, t = c.model.vision, c.model.text
    oc = tiny_open_clip(seed=11, embed_dim=c.model.embed_dim, image_size=v.image_size, patch_size=v.patch_size,
                        vision=(v.width, v.depth, v.num_heads), text=(t.width, t.depth, t.num_heads), vocab=1024,
                        context=t.context_length)
    path = str(tmp_path / "tiny_open_clip.safetensors")
    weight_files.save_state_dict(state_dict(oc), path)
    config = tiny_config(init_from=path, **{"model.text.vocab_size": 1024})
    workdir = str(tmp_path / "run")
    run = train.build_run(config, workdir)
    expected = weights.state_dict_to_params(state_dict(oc), run.config.model)
    got = jax.device_get(run.state.params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # On resume the run's checkpoint wins; a config that does not fit the checkpoint fails in one line.
    os.makedirs(os.path.join(workdir, "checkpoints", "4"))
    assert weights.init_from_params(run.config, workdir) is None
    wrong = run.config.copy_and_resolve_references()
    wrong.model.vision.patch_size = 2
    with pytest.raises(ConfigError, match=r"init_from=.*patch 4\) but model.vision.patch_size=2"):
        weights.init_from_params(wrong, str(tmp_path / "fresh"))


def test_cli_import_and_export(tmp_path, capsys):
    oc = tiny_open_clip(seed=12)
    src, params, out = (str(tmp_path / n) for n in ("in.safetensors", "params.msgpack", "out.pt"))
    weight_files.save_state_dict(state_dict(oc), src)
    convert_cli.main([f"--input={src}", f"--output={params}"])
    assert "-> " + params in capsys.readouterr().out
    convert_cli.main(["--export", f"--input={params}", f"--output={out}"])
    back = weight_files.load_state_dict(out)
    for key, value in state_dict(oc).items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
