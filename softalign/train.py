"""The training loop: ``train_and_evaluate(config, workdir)``.

Wires config -> data -> model -> loss/teacher -> jitted step, then runs it with periodic metrics, evaluation and
Orbax checkpoints. A run resumes from the latest checkpoint in ``workdir``; a finished run only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import tempfile
import time
from typing import Any

import clu.metrics
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from etils import epath

from softalign import checkpointing, config_checks, convert, memory_bank, metric_io, sharding
from softalign.data import pipeline
from softalign.data.sources import build_source, sample_captions
from softalign.data.tokenizer import Tokenizer, corpus_tokenizer, synthetic_tokenizer
from softalign.evaluation import suite
from softalign.models import CLIP, build_model
from softalign.optim import make_optimizer
from softalign.step import TrainState, create_state, jit_train_step, make_train_step
from softalign.teachers import make_teacher

TOKENIZER_FILE = "tokenizer.json"
RESULTS_FILE = "eval_results.json"
DONE_FILE = "done.json"  # written last when a run completes: what sweeps use to tell finished runs


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the message names the step."""


def load_tokenizer(config: Any, workdir: str) -> Tokenizer:
    """The configured tokenizer.json, else the one this run trained before, else a new BPE on synthetic captions."""
    length = config.model.text.context_length
    if config.tokenizer.path:
        return Tokenizer.from_file(config.tokenizer.path, length)
    path = epath.Path(workdir) / TOKENIZER_FILE
    if path.exists():
        with tempfile.TemporaryDirectory() as tmp:  # the workdir may be remote (gs://); tokenizers reads local files
            local = os.path.join(tmp, TOKENIZER_FILE)
            epath.Path(local).write_bytes(path.read_bytes())
            return Tokenizer.from_file(local, length)
    if config.data.source != "synthetic":
        tok = corpus_tokenizer(sample_captions(config.data, config.tokenizer.num_captions), length,
                               vocab_size=config.tokenizer.vocab_size)
    else:
        tok = synthetic_tokenizer(length, vocab_size=config.tokenizer.vocab_size,
                                  num_captions=config.tokenizer.num_captions, seed=config.data.seed)
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(os.path.join(tmp, TOKENIZER_FILE))
            staged = path.parent / (TOKENIZER_FILE + ".tmp")
            staged.write_bytes(epath.Path(tmp, TOKENIZER_FILE).read_bytes())
            staged.rename(path)  # other processes and restarts never read a partial file
    logging.info("Trained a BPE tokenizer (vocab %d) on %s captions -> %s", tok.vocab_size, config.data.source, path)
    return tok


def resolve_config(config: Any, tokenizer: Tokenizer) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the text tower's vocabulary and end-of-text id taken from the tokenizer."""
    config = ml_collections.ConfigDict(config.to_dict())
    text = config.model.text
    if text.vocab_size <= 0:
        text.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > text.vocab_size:
        raise config_checks.ConfigError(
            f"model.text.vocab_size={text.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if text.eot_id < 0:
        text.eot_id = tokenizer.eot_id
    elif text.eot_id != tokenizer.eot_id:  # the text tower pools at eot_id: it must be the tokenizer's
        raise config_checks.ConfigError(
            f"model.text.eot_id={text.eot_id} but the tokenizer's end-of-text id is {tokenizer.eot_id} "
            "(set it to -1 to take it from the tokenizer)")
    return config


@dataclasses.dataclass
class Run:
    """Everything built from the config that the loop and the evaluators need."""

    config: Any
    mesh: Any
    model: CLIP
    state: TrainState
    train_step: Any
    state_shardings: Any
    tokenizer: Tokenizer
    encode_image: Any  # jitted (params, images) -> emb
    encode_text: Any


def build_run(config: Any, workdir: str) -> Run:
    """Builds mesh, tokenizer, model, optimizer, teacher, initial state and the jitted step (not yet compiled)."""
    num_devices = jax.device_count() if config.num_devices <= 0 else config.num_devices
    config_checks.validate(config, num_data_shards=num_devices, workdir=workdir)
    mesh = sharding.make_mesh(num_devices, fsdp=config.fsdp)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config, workdir)
    config = resolve_config(config, tokenizer)
    config_checks.validate(config, num_data_shards=num_devices)
    model = build_model(config.model)
    tx, lr_schedule = make_optimizer(config.optim, config.num_steps)
    teacher = make_teacher(config.psd)

    size = config.data.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.model.text.context_length), jnp.int32)

    pretrained = convert.init_from_params(config, workdir)  # None unless init_from is set and the run is fresh

    def init_state(pretrained=None):
        params = model.init(jax.random.key(config.seed), images, tokens)["params"]
        if pretrained is not None:  # fine-tuning: converted open_clip / OpenAI weights (shapes checked)
            params = pretrained
        return create_state(params, tx, teacher, config.seed)

    state_shardings = sharding.state_sharding(mesh, jax.eval_shape(init_state), fsdp_min_size=config.fsdp_min_size,
                                              rules=[tuple(r) for r in config.sharding_rules])
    state = jax.jit(init_state, out_shardings=state_shardings)(pretrained)
    step_fn = make_train_step(model=model, tx=tx, lr_schedule=lr_schedule, teacher=teacher, psd_config=config.psd,
                              num_steps=config.num_steps, mesh=mesh, batch_size=config.batch_size,
                              loss_chunk_size=config.loss_chunk_size, grad_accum_steps=config.grad_accum_steps)
    encode = lambda method: jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    return Run(config, mesh, model, state, jit_train_step(step_fn, mesh, state_shardings), state_shardings,
               tokenizer, encode(CLIP.encode_image), encode(CLIP.encode_text))


def evaluate(run: Run, evaluators: list[suite.Evaluator], params: Any) -> dict[str, dict[str, float]]:
    """Runs ``evaluators`` on ``params``; returns ``{name: metrics}``."""
    enc_img = functools.partial(run.encode_image, params)
    enc_txt = functools.partial(run.encode_text, params)
    return {ev.name: ev.run(enc_img, enc_txt) for ev in evaluators}


def report(results: dict[str, dict[str, float]], evaluators: list[suite.Evaluator], step: int,
           final: bool = False) -> None:
    """Logs evaluation lines; the final ones also go to stdout, each beside its chance level."""
    chances = {ev.name: ev.chance for ev in evaluators}
    for name, metrics in results.items():
        for line in suite.report_lines(f"[step {step}] {name}", metrics, chances[name]):
            if final:
                print(line, flush=True)
            else:
                logging.info("%s", line)


def _write_results(workdir: str, step: int, results: dict[str, dict[str, float]]) -> None:
    if jax.process_index() == 0:
        text = json.dumps({"step": step, "results": results}, indent=2, sort_keys=True)
        (epath.Path(workdir) / RESULTS_FILE).write_text(text)


def _write_done(workdir: str, step: int, num_steps: int, wall_seconds: float, train: dict[str, float]) -> None:
    """Marks the run complete: ``done.json`` with the final step, ``num_steps``, this process's wall seconds and
    the last logged train metrics. Written after ``eval_results.json``, staged and renamed, so it never exists for
    an unfinished run."""
    if jax.process_index() == 0:
        text = json.dumps({"step": step, "num_steps": num_steps, "wall_seconds": round(wall_seconds, 3),
                           "train": train, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2,
                          sort_keys=True)
        staged = epath.Path(workdir) / (DONE_FILE + ".tmp")
        staged.write_text(text)
        staged.rename(epath.Path(workdir) / DONE_FILE)


def _metrics_collection(names):
    return clu.metrics.Collection.create(**{n: clu.metrics.Average.from_output(n) for n in names})


class _StopFlag:
    """Set by SIGTERM (preemption) or Ctrl-C: the loop saves a checkpoint and exits cleanly. A second Ctrl-C
    interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.stop = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("%s received: saving a checkpoint and exiting", signal.Signals(signum).name)
        self.stop = True

    def agreed(self, step: int, every: int) -> bool:
        """Whether all processes stop after ``step``. With several processes they agree every ``every`` steps (a
        process that saw SIGTERM runs on to that step), so all of them join the same final multi-host save."""
        if jax.process_count() == 1:
            return self.stop
        if step % every:
            return False
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.stop))))

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _check_finite(state: TrainState, ckpt: checkpointing.Checkpointer) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        raise NonFiniteLossError(
            f"loss or gradient became non-finite at step {bad}; that update was skipped and training stopped. "
            f"The last good checkpoint (step {ckpt.latest_step()}) is kept.")


def _make_memory_bank(config: Any, ckpt: checkpointing.Checkpointer,
                      restored_step: int | None) -> memory_bank.MemoryBank | None:
    """The ``memory`` teacher's host bank (None for other teachers): one row per train record, since
    ``batch['index']`` is the record's index in the train split; restored from checkpoint ``restored_step``."""
    if not getattr(make_teacher(config.psd), "host_memory", False):
        return None
    size = len(build_source(config.data, "train"))
    bank = memory_bank.MemoryBank(size, config.model.embed_dim, config.psd.memory_dtype)
    print(bank.describe(), flush=True)
    logging.info("%s", bank.describe())
    if restored_step is not None:
        saved = ckpt.restore_memory(restored_step)
        if saved is None:
            logging.warning("checkpoint %d has no memory bank: the memory teacher starts empty", restored_step)
        else:
            bank.load(saved)
    return bank


def train_and_evaluate(config: Any, workdir: str) -> dict[str, dict[str, float]]:
    """Trains (or resumes) in ``workdir`` and returns the final evaluation results."""
    started = time.time()
    run = build_run(config, workdir)
    config = run.config
    is_main = jax.process_index() == 0
    writer = metric_io.create_writers(workdir, just_logging=not is_main)
    evaluators = suite.build_evaluators(config, run.tokenizer, sharding.batch_sharding(run.mesh))
    data_iter = pipeline.make_train_iterator(
        config.data, run.tokenizer, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    state = run.state
    restored = ckpt.restore(checkpointing.abstract_like(state), data_iter)
    if restored is not None:
        state, step = restored
        message = f"Restored checkpoint at step {step} from {ckpt.directory}"
        print(message, flush=True)
        logging.info(message)
    else:
        writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})
    step = int(jax.device_get(state.step))
    last = config.num_steps
    end = last if config.stop_at_step <= 0 else min(last, config.stop_at_step)
    if step >= last:
        print(f"Run complete ({step}/{last} steps); re-evaluating the final checkpoint.", flush=True)
        results = evaluate(run, evaluators, state.params)
        report(results, evaluators, step, final=True)
        if not (epath.Path(workdir) / DONE_FILE).exists():  # e.g. killed after the final save: complete it now
            if not (epath.Path(workdir) / RESULTS_FILE).exists():
                _write_results(workdir, step, results)
            _write_done(workdir, step, last, time.time() - started, {})
        ckpt.close()
        return results

    bank = _make_memory_bank(config, ckpt, step if restored is not None else None)
    batch_sharding = sharding.batch_sharding(run.mesh)
    progress = metric_io.ProgressReporter(last, writer, every_secs=30)
    stop_flag = _StopFlag()
    results: dict[str, dict[str, float]] = {}
    accumulated = None
    last_train: dict[str, float] = {}
    try:
        stopping = False
        while step < end and not stopping:
            local = next(data_iter)
            if bank is not None:  # the memory teacher's rows of this batch, looked up on the host
                local = {**local, **bank.lookup(local["index"])}
            batch = pipeline.to_global_batch(local, batch_sharding)
            state, metrics = run.train_step(state, batch)
            if bank is not None:  # writes back the previous step's embeddings; this step's stay pending
                bank.stage(metrics.pop(memory_bank.MEMORY_OUTPUT), step)
            step += 1
            if accumulated is None:
                collection = _metrics_collection(metrics.keys())
                accumulated = collection.single_from_model_output(**metrics)
            else:
                accumulated = accumulated.merge(collection.single_from_model_output(**metrics))
            progress(step, examples=config.batch_size)
            if step % config.log_every == 0 or step == end:
                _check_finite(state, ckpt)
                last_train = {f"train/{k}": float(v) for k, v in accumulated.compute().items()}
                writer.write_scalars(step, last_train)
                data_metrics = pipeline.data_metrics()  # data/skipped/<reason>, data/caption_noise/*, ...
                if data_metrics:
                    writer.write_scalars(step, data_metrics)
                accumulated = None
            due = [ev for ev in evaluators if ev.every > 0 and ev.due(step, last) and step != last]
            if due:
                with progress.timed("eval"):
                    partial = evaluate(run, due, state.params)
                _write_eval(writer, step, partial)
                report(partial, due, step)
            stopping = stop_flag.agreed(step, config.log_every)
            if step % config.checkpoint_every == 0 or step == end or stopping:
                _check_finite(state, ckpt)
                with progress.timed("checkpoint"):
                    ckpt.save(step, state, data_iter, force=True,
                              memory=None if bank is None else bank.state_dict())
        if step >= last:
            with progress.timed("eval"):
                results = evaluate(run, evaluators, state.params)
            _write_eval(writer, step, results)
            report(results, evaluators, step, final=True)
            _write_results(workdir, step, results)
            _write_done(workdir, step, last, time.time() - started, last_train)
    finally:
        stop_flag.restore()
        data_iter.close()  # stops Grain worker processes, if any
        ckpt.close()
        writer.flush()
    return results


def _write_eval(writer, step, results):
    writer.write_scalars(step, {f"eval/{name}/{k}": v for name, m in results.items() for k, v in m.items()})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
