"""Weight files: reading and writing open_clip / OpenAI CLIP state dicts (``.safetensors``, ``.pt``/``.pth``/``.bin``,
OpenAI's TorchScript archives) and softalign params (``.msgpack``); ``flatten``/``unflatten`` between nested params
and ``{'a/b/c': leaf}``.

torch and safetensors are imported only when a file of their kind is read or written, so softalign itself never
needs torch.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from typing import Any

import numpy as np

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def _read_safetensors_raw(path: str) -> StateDict:
    """Header-level reader for what numpy cannot name (bfloat16, through ml_dtypes, a JAX dependency)."""
    import ml_dtypes

    dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def _torch_to_numpy(obj: Any) -> Any:
    """A tensor as numpy (floating point as float32, which also covers bf16/fp16); anything else unchanged."""
    import torch

    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return (obj.float() if obj.is_floating_point() else obj).numpy()
    return obj


def _is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it holds a ``constants.pkl``; torch.save's zips do not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _load_torch(path: str) -> Any:
    """torch.load with weights_only=True; OpenAI's TorchScript archives go through torch.jit.load (as open_clip's
    own OpenAI loader does), since torch.load refuses them with weights_only."""
    import torch

    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch 2.9+ marks torch.jit deprecated; these archives still need it
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").state_dict()
    return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(path: str) -> StateDict:
    """An open_clip / OpenAI CLIP checkpoint as ``{name: numpy array}``, floats as float32.

    Accepts ``.safetensors`` (no torch needed), torch pickles (``.pt``/``.pth``/``.bin``, optionally a training
    checkpoint ``{'state_dict': ...}``) and OpenAI's TorchScript archives; a DDP ``module.`` prefix is stripped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            sd = load_file(path)
        except TypeError:  # a dtype numpy lacks, e.g. bfloat16
            sd = _read_safetensors_raw(path)
        sd = {k: v.astype(np.float32) if v.dtype.kind in "fV" else v for k, v in sd.items()}  # V: bfloat16
    elif path.endswith(TORCH_SUFFIXES):
        obj = _load_torch(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if hasattr(obj, "state_dict") and not isinstance(obj, dict):
            obj = obj.state_dict()
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
        sd = {k: _torch_to_numpy(v) for k, v in obj.items()}
    else:
        raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors or one of {TORCH_SUFFIXES}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def save_state_dict(sd: StateDict, path: str) -> None:
    """Writes a state dict as ``.safetensors`` (numpy API) or as a torch pickle (``.pt``/``.pth``/``.bin``)."""
    sd = {k: np.array(v, order="C") for k, v in sd.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(sd, path)
    elif path.endswith(TORCH_SUFFIXES):
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    else:
        raise ValueError(f"{path}: unknown output format; expected .safetensors or one of {TORCH_SUFFIXES}")


def load_params(path: str) -> Params:
    """softalign params saved by ``save_params`` (flax msgpack), as nested dicts of numpy arrays."""
    from flax import serialization

    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


def save_params(params: Any, path: str) -> None:
    """Writes a params pytree as flax msgpack (what ``config.init_from`` and ``--export`` read back)."""
    from flax import serialization

    params = unflatten({k: np.asarray(v) for k, v in flatten(params).items()})
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(params))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{'a/b/c': leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict[str, Any]) -> Params:
    """``{'a/b/c': leaf}`` -> nested dicts."""
    out: Params = {}
    for path, leaf in flat.items():
        *parents, last = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out
