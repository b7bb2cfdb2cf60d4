"""Weight conversion from the command line: ``python -m softalign.convert`` (or ``softalign-convert``).

Imports open_clip / OpenAI CLIP checkpoints to softalign params, and exports params or a training run's
checkpoint back to an open_clip state dict. The formats and the mapping are documented in
``softalign/interop/weights.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

import jax
import numpy as np

from softalign.interop import weight_files, weights
from softalign.interop.weight_files import Params
from softalign.training import checkpointing, setup


def restore_run_params(config_file: str, workdir: str, step: int | None = None) -> Params:
    """The params of a training run's checkpoint (only ``params`` is read), for the run's config file."""
    spec = importlib.util.spec_from_file_location("softalign_run_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded = setup.load_model(module.get_config(), workdir)
    params, _, _ = checkpointing.restore_params(workdir, loaded.abstract_params, step)
    return jax.device_get(params)


def main(argv: Sequence[str] | None = None) -> None:
    """Converts one checkpoint (see the module docstring) and prints what it wrote."""
    parser = argparse.ArgumentParser(prog="python -m softalign.convert", description=weights.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="", help="open_clip checkpoint (import) or params .msgpack (--export)")
    parser.add_argument("--output", required=True, help="params .msgpack (import) or .safetensors/.pt (--export)")
    parser.add_argument("--export", action="store_true", help="softalign params -> open_clip state dict")
    parser.add_argument("--activation", default="gelu", choices=("gelu", "quick_gelu"),
                        help="recorded in the printed config only (weights do not say; see the docstring)")
    parser.add_argument("--config", default="", help="with --export --workdir: the run's config file "
                        "(model overrides the run was given must be in it)")
    parser.add_argument("--workdir", default="", help="with --export: a training run to export")
    parser.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step (default latest)")
    args = parser.parse_args(argv)
    if args.export:
        if args.workdir:
            if not args.config:
                parser.error("--export --workdir needs --config (the run's config file)")
            params = restore_run_params(args.config, args.workdir, args.step)
        elif args.input:
            params = weight_files.load_params(args.input)
        else:
            parser.error("--export needs --input=params.msgpack or --workdir")
        sd = weights.params_to_state_dict(params)
        weight_files.save_state_dict(sd, args.output)
        print(f"wrote {len(sd)} open_clip tensors to {args.output}")
        return
    if not args.input:
        parser.error("--input is required")
    sd = weight_files.load_state_dict(args.input)
    cfg = weights.infer_model_config({k: v for k, v in sd.items() if not weights.is_ignored(k)})
    cfg.activation = args.activation
    params = weights.state_dict_to_params(sd, cfg)
    weight_files.save_params(params, args.output)
    count = sum(int(np.prod(np.shape(x))) for x in weight_files.flatten(params).values())
    print(f"{args.input}: {weights.describe(cfg)}, {count:,} parameters -> {args.output}\nmodel config:\n{cfg}")


def run() -> None:
    """The ``softalign-convert`` console script."""
    main()


if __name__ == "__main__":
    run()
