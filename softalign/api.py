"""The public API: ``softalign.load(run_or_weights)`` -> a `Model` that embeds images and texts.

    import softalign
    model = softalign.load("/tmp/sa-demo")                         # a training run's workdir (latest checkpoint)
    img = model.encode_image([PIL.Image.open("cat.jpg")])          # (1, D), L2-normalised; resize + normalise inside
    txt = model.encode_text(["a photo of a cat", "a dog"])         # (2, D); tokenization inside
    probs = softmax(100 * img @ model.zero_shot_classifier(["cat", "dog"]).T)

A workdir is rebuilt from its ``config.json`` (the resolved config that training writes), its ``tokenizer.json`` and
an Orbax partial restore of ``params`` (no optimizer state is read). Weight files (open_clip ``.safetensors``/
``.pt``/``.bin`` or softalign ``.msgpack``) are imported through `softalign.interop.weights`; their model config is
inferred from the tensor shapes unless ``config`` is given, and they need a tokenizer (``tokenizer=`` a
tokenizer.json, ``config.tokenizer.path``, else CLIP's BPE from an installed open_clip).
"""

from __future__ import annotations

import functools
import json
import os
import runpy
from typing import Any, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np
from PIL import Image

from softalign import workdir as run_files
from softalign.config.schema import base_config
from softalign.data.decode import resize_center
from softalign.data.pipeline import CLIP_MEAN, CLIP_STD, normalize_images
from softalign.data.tokenizer import Tokenizer
from softalign.evaluation.embedding import embed_in_batches
from softalign.evaluation.images import to_rgb_array
from softalign.evaluation.zeroshot import DEFAULT_TEMPLATES, build_classifier
from softalign.models import build_model
from softalign.parallel import sharding
from softalign.training import checkpointing, setup

WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".pt", ".pth", ".bin")
ConfigLike = Union[ml_collections.ConfigDict, dict, str, None]


class Model:
    """A CLIP with its tokenizer and preprocessing; every method takes and returns numpy arrays."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, tokenizer: Tokenizer, *,
                 step: Optional[int] = None, source: str = ""):
        self.config, self.tokenizer, self.step, self.source = config, tokenizer, step, source
        self.image_size = int(config.model.vision.image_size)
        self.mean = tuple(config.data.get("mean", CLIP_MEAN))
        self.std = tuple(config.data.get("std", CLIP_STD))
        self._devices = setup.device_count(config)
        mesh = sharding.make_mesh(self._devices)
        self.batch_sharding = sharding.batch_sharding(mesh)  # what evaluators put their batches on
        self.params = jax.device_put(params, sharding.replicated(mesh))
        self._encode_image, self._encode_text = setup.encoders(build_model(config.model))

    @property
    def embed_dim(self) -> int:
        return int(self.config.model.embed_dim)

    def preprocess(self, image: Any) -> np.ndarray:
        """A PIL image (or uint8 HWC array, path, encoded bytes) -> normalised float32 (S, S, 3): shorter side
        resized to the model's size, centre crop, CLIP mean/std (as open_clip's eval transform)."""
        pixels = resize_center(to_rgb_array(image), self.image_size)
        return normalize_images(pixels, self.mean, self.std)

    def _pixels(self, images: Any, preprocessed: bool) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim in (3, 4):
            batch = images[None] if images.ndim == 3 else images
            if preprocessed:
                return _check_size(np.asarray(batch, np.float32), self.image_size)
            if np.issubdtype(batch.dtype, np.floating):
                if batch.size and (float(batch.min()) < 0.0 or float(batch.max()) > 1.0):
                    raise ValueError("float images must be pixels in [0, 1]; for preprocess() outputs (already "
                                     "normalised) pass preprocessed=True")
                if batch.shape[1:3] == (self.image_size, self.image_size):
                    return normalize_images(batch * 255.0, self.mean, self.std)
                batch = np.round(batch * 255.0).astype(np.uint8)
            return np.stack([self.preprocess(im) for im in batch]) if len(batch) else batch.astype(np.float32)
        if isinstance(images, (Image.Image, str, os.PathLike, bytes)):
            images = [images]
        if preprocessed:
            return _check_size(np.stack([np.asarray(im, np.float32) for im in images]), self.image_size)
        return np.stack([self._pixels(np.asarray(im), False)[0] if isinstance(im, np.ndarray)
                         else self.preprocess(im) for im in images])

    def encode_image(self, images: Any, *, preprocessed: bool = False) -> np.ndarray:
        """L2-normalised image embeddings (n, D) of PIL images, paths, or uint8/float [0, 1] HWC arrays (one image
        or a batch; resized and normalised here). ``preprocessed=True``: `preprocess` outputs, used as they are."""
        return self._embed(self._encode_image, self._pixels(images, preprocessed))

    def encode_text(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """L2-normalised text embeddings (n, D); tokenized (and truncated) with the run's tokenizer."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._embed(self._encode_text, self._tokens(texts))

    def encode_text_embedding(self, embeddings: np.ndarray) -> np.ndarray:
        """A precomputed-text model's joint-space embeddings (n*K, D) of text embeddings (n, [K,] input_dim)."""
        if self.config.model.text.get("kind", "transformer") != "precomputed":
            raise ValueError("encode_text_embedding is for model.text.kind='precomputed'; use encode_text")
        arr = np.asarray(embeddings, np.float32)
        return self._embed(self._encode_text, arr.reshape(-1, arr.shape[-1]))

    def _tokens(self, texts: Sequence[str]) -> np.ndarray:
        if self.config.model.text.get("kind", "transformer") == "precomputed":
            raise ValueError("this model's text tower reads precomputed text embeddings (model.text.kind="
                             "'precomputed'), not caption strings: use encode_text_embedding")
        return self.tokenizer.encode_batch(texts)

    def zero_shot_classifier(self, classnames: Sequence[str],
                             templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """(C, D) zero-shot weights: per class, the renormalised mean of its prompts' normalised embeddings
        (templates with a ``{}``), as the zero-shot evaluator builds them."""
        self._tokens([])   # refuses a precomputed-text model
        encode = lambda tokens: self._embed(self._encode_text, tokens)
        return build_classifier(encode, self.tokenizer, list(classnames), list(templates))

    def embedding_fns(self, params: Any = None) -> tuple[Any, Any]:
        """``(images -> embeddings, tokens -> embeddings)``, compiled, over `params` (default the model's): the
        form `softalign.evaluation` evaluators take (batches already normalised / tokenized)."""
        params = self.params if params is None else params
        return functools.partial(self._encode_image, params), functools.partial(self._encode_text, params)

    def _embed(self, fn: Any, array: np.ndarray) -> np.ndarray:
        """``fn(params, batch)`` over `array` in padded batches of a power-of-two size (few compilations)."""
        n = len(array)
        if n == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        size = min(int(self.config.eval_batch_size), 1 << max(n - 1, 0).bit_length())
        size = -(-max(size, self._devices) // self._devices) * self._devices
        return embed_in_batches(lambda x: fn(self.params, x), array, size, self.batch_sharding, jit=False)

    def __repr__(self) -> str:
        m = self.config.model
        return (f"softalign.Model({self.source!r}, step={self.step}, image {self.image_size} px, "
                f"vision {m.vision.width}x{m.vision.depth}, text {m.text.width}x{m.text.depth}, D={self.embed_dim})")


def _check_size(batch: np.ndarray, size: int) -> np.ndarray:
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
        raise ValueError(f"preprocessed images must be (n, {size}, {size}, 3), got {batch.shape}")
    return batch


def as_config(config: ConfigLike) -> Optional[ml_collections.ConfigDict]:
    """A config from a ConfigDict, a dict, a ``config.json`` or a ``configs/*.py`` file (its ``get_config()``),
    laid over `base_config` so keys added since the run was written take their defaults."""
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if path.endswith(".py"):
            config = runpy.run_path(path)["get_config"]()
        else:
            with open(path) as f:
                config = json.load(f)
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    merged = base_config()
    merged.update(values)
    return merged


def load(path: str, step: Optional[int] = None, config: ConfigLike = None, *,
         tokenizer: Optional[str] = None) -> Model:
    """The model of a training run's workdir (checkpoint `step`, default the latest) or of a weight file.

    `config` overrides the run's ``config.json`` (required for runs written before training saved it) or, for a
    weight file, the inferred architecture (e.g. heads, activation). `tokenizer`: a tokenizer.json path."""
    path = os.fspath(path)
    config = as_config(config)
    if os.path.isdir(path):
        return _load_workdir(path, step, config, tokenizer)
    if path.endswith(WEIGHT_SUFFIXES) and os.path.isfile(path):
        if step is not None:
            raise ValueError("step= applies to a workdir, not to a weight file")
        return _load_weights(path, config, tokenizer)
    raise FileNotFoundError(f"{path}: neither a training run's workdir nor a weight file "
                            f"({', '.join(WEIGHT_SUFFIXES)})")


def _load_workdir(workdir: str, step: Optional[int], config: Optional[ml_collections.ConfigDict],
                  tokenizer: Optional[str]) -> Model:
    if config is None:
        saved = os.path.join(workdir, run_files.CONFIG_FILE)
        if not os.path.exists(saved):
            raise FileNotFoundError(f"{saved} is missing (a run from before training saved its config): pass "
                                    "config= the run's config file")
        config = as_config(saved)
    if tokenizer:
        config.tokenizer.path = tokenizer
    loaded = setup.load_model(config, workdir)
    params, step, _ = checkpointing.restore_params(workdir, loaded.abstract_params, step)
    return Model(loaded.config, params, loaded.tokenizer, step=step, source=workdir)


def _load_weights(path: str, config: Optional[ml_collections.ConfigDict], tokenizer: Optional[str]) -> Model:
    from softalign.interop import weight_files, weights

    if config is None:
        state = weight_files.load_state_dict(path) if not path.endswith(".msgpack") else \
            weights.params_to_state_dict(weight_files.load_params(path))
        config = base_config()
        config.model = weights.infer_model_config({k: v for k, v in state.items() if not weights.is_ignored(k)})
        config.model.text.eot_id = -1  # the weights do not say: take it from the tokenizer
        config.data.image_size = config.model.vision.image_size
    tok = _weights_tokenizer(tokenizer or config.tokenizer.path, int(config.model.text.context_length))
    config = setup.resolve_config(config, tok)
    params = weights.load_pretrained(path, config.model)
    return Model(config, params, tok, source=path)


def _weights_tokenizer(path: str, context_length: int) -> Tokenizer:
    if path:
        return Tokenizer.from_file(path, context_length)
    from softalign.interop import clip_bpe

    try:
        return Tokenizer(clip_bpe.build_clip_tokenizer(), context_length)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"weight files carry no tokenizer: pass tokenizer= a tokenizer.json ({e})") from None
