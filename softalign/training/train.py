"""The training loop: ``train_and_evaluate(config, workdir)``.

Wires config -> data -> model -> objective/teacher -> jitted step, then runs it with periodic metrics, evaluation
and Orbax checkpoints. A run resumes from the latest checkpoint in ``workdir``; a finished run only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import clu.metrics
import jax
import numpy as np
from absl import logging
from etils import epath

from softalign import workdir as run_files
from softalign.config import checks
from softalign.data import pipeline
from softalign.data.sources import build_source
from softalign.data.tokenizer import Tokenizer
from softalign.evaluation import suite
from softalign.models import CLIP, build_model, example_inputs, precision
from softalign.objectives import memory_bank, prototypes, registry
from softalign.parallel import sharding
from softalign.training import checkpointing, elastic, external_teacher, lit, setup, signals, writers
from softalign.training.optim import make_optimizer
from softalign.training.step import (
    StepFn,
    TrainState,
    all_finite,
    build_train_step,
    create_state,
    jit_train_step,
    split_params,
    with_objective_params,
)

Results = dict[str, dict[str, float]]


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient or updated state became NaN/Inf; the message names the step."""


@dataclasses.dataclass
class Run:
    """Everything built from the config that the loop and the evaluators need."""

    config: Any
    mesh: Any
    model: CLIP
    state: TrainState
    train_step: StepFn
    state_shardings: Any
    tokenizer: Tokenizer
    encode_image: Any  # jitted (model params, images) -> emb
    encode_text: Any


def build_run(config: Any, workdir: str) -> Run:
    """Builds mesh, tokenizer, model, optimizer, teacher, objective, initial state and the jitted step."""
    num_devices = setup.device_count(config)
    checks.validate(config, num_data_shards=num_devices, workdir=workdir, available_devices=jax.device_count())
    mesh = sharding.make_mesh(num_devices, fsdp=config.fsdp)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    tokenizer = setup.load_tokenizer(config, workdir)
    config = setup.resolve_config(config, tokenizer)
    if jax.process_index() == 0:  # the resolved config, so softalign.load and the tools can rebuild the model
        run_files.write_json_atomic(os.path.join(workdir, run_files.CONFIG_FILE), config.to_dict())
    checks.validate(config, num_data_shards=num_devices)
    model = build_model(config.model)
    tx, lr_schedule = make_optimizer(config.optim, config.num_steps)
    step_fn, teacher, objective = build_train_step(config, model=model, mesh=mesh, tx=tx, lr_schedule=lr_schedule)
    images, tokens = example_inputs(config.model)
    # None unless init_from (or distill.inherit) is set and the run is fresh
    pretrained = external_teacher.initial_params(config, workdir, teacher)

    def init_state(pretrained=None, teacher_inputs=None):
        params = model.init(jax.random.key(config.seed), images, tokens)["params"]
        if pretrained is not None:  # fine-tuning: converted open_clip / OpenAI weights (shapes checked)
            params = pretrained
        return create_state(with_objective_params(params, objective), tx, teacher, config.seed, teacher_inputs)

    state_shardings = sharding.state_sharding(mesh, jax.eval_shape(init_state), fsdp_min_size=config.fsdp_min_size,
                                              rules=[tuple(r) for r in config.sharding_rules])
    # a frozen teacher's weights are an argument, not constants compiled into the init (a B/16 teacher's 150M)
    state = jax.jit(init_state, out_shardings=state_shardings)(pretrained, teacher.init_inputs())
    encode_image, encode_text = setup.encoders(model)
    return Run(config, mesh, model, state, jit_train_step(step_fn, mesh, state_shardings), state_shardings,
               tokenizer, encode_image, encode_text)


def evaluate(run: Run, evaluators: list[suite.Evaluator], params: Any) -> Results:
    """Runs ``evaluators`` on the model part of ``params``; returns ``{name: metrics}``."""
    model_params = split_params(params)[0]
    enc_img = functools.partial(run.encode_image, model_params)
    enc_txt = functools.partial(run.encode_text, model_params)
    return {ev.name: ev.run(enc_img, enc_txt) for ev in evaluators}


def report(results: Results, evaluators: list[suite.Evaluator], step: int, final: bool = False) -> None:
    """Logs evaluation lines; the final ones also go to stdout, each beside its chance level."""
    chances = {ev.name: ev.chance for ev in evaluators}
    for name, metrics in results.items():
        for line in suite.report_lines(f"[step {step}] {name}", metrics, chances[name]):
            if final:
                print(line, flush=True)
            else:
                logging.info("%s", line)


def _write_results(workdir: str, step: int, results: Results) -> None:
    if jax.process_index() == 0:
        run_files.write_json_atomic(os.path.join(workdir, run_files.RESULTS_FILE), {"step": step, "results": results})


def _write_done(workdir: str, step: int, num_steps: int, wall_seconds: float, train: dict[str, float]) -> None:
    """Marks the run complete: ``done.json`` with the final step, ``num_steps``, this process's wall seconds and
    the last logged train metrics. Written after ``eval_results.json`` and the final checkpoint, staged and
    renamed, so it never exists for an unfinished run."""
    if jax.process_index() == 0:
        run_files.write_json_atomic(os.path.join(workdir, run_files.DONE_FILE), {
            "step": step, "num_steps": num_steps, "wall_seconds": round(wall_seconds, 3), "train": train,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _kept(ckpt: checkpointing.Checkpointer) -> str:
    """Which checkpoint a stopped run leaves to resume from (once the save in flight has finished or failed)."""
    good = ckpt.last_good_step()
    if good is None:
        return "No checkpoint was saved before it, so a rerun starts from scratch."
    return f"The last good checkpoint (step {good}) is kept."


def _check_finite(state: TrainState, ckpt: checkpointing.Checkpointer, step: int) -> None:
    """Stops the run before anything non-finite is logged as good or saved."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        raise NonFiniteLossError(
            f"loss or gradient became non-finite at step {bad}; that update was skipped and training stopped. "
            f"{_kept(ckpt)}")
    if not bool(all_finite((state.params, state.opt_state))):  # e.g. an update that overflowed float32
        raise NonFiniteLossError(
            f"parameters or optimizer state became non-finite by step {step} (the loss and gradient were finite: "
            f"is the learning rate too large?); training stopped before saving them. {_kept(ckpt)}")


class _MemoryHook:
    """The ``memory`` teacher's host bank, wired into the loop: rows looked up before each step, the step's
    embeddings written back after it, the bank saved with every checkpoint. A no-op for other teachers. With
    ``objective.name='protoclip'`` it also adds the bank's k-means prototypes to each batch (objectives/prototypes)."""

    def __init__(self, config: Any, ckpt: checkpointing.Checkpointer, restored_step: int | None):
        self.bank = self.prototypes = None
        if not registry.make_teacher(config.psd).host_memory:
            return
        size = len(build_source(config.data, "train"))  # batch['index'] is the record's index in the train split
        memory_bank.check_fits(size, config.model.embed_dim, config.psd.memory_dtype)
        self.bank = memory_bank.MemoryBank(size, config.model.embed_dim, config.psd.memory_dtype)
        print(self.bank.describe(), flush=True)
        logging.info("%s", self.bank.describe())
        saved = None if restored_step is None else ckpt.restore_memory(restored_step)
        if restored_step is not None and saved is None:
            logging.warning("checkpoint %d has no memory bank: the memory teacher starts empty", restored_step)
        elif saved is not None:
            self.bank.load(saved)
        self.prototypes = prototypes.hook_for(config, self.bank, jax.process_index(), jax.process_count())
        if self.prototypes is not None and saved is not None and not self.prototypes.load(saved):
            logging.warning("checkpoint %d has no prototypes: the first step re-clusters the bank", restored_step)

    def before(self, local: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        local = local if self.bank is None else {**local, **self.bank.lookup(local["index"])}
        return local if self.prototypes is None else self.prototypes.before(local, step)

    def after(self, host: dict[str, jax.Array], step: int) -> None:
        if self.bank is not None:  # writes back the previous step's embeddings; this step's stay pending
            self.bank.stage(host, step)

    def state_dict(self) -> dict[str, np.ndarray] | None:
        if self.bank is None:
            return None
        state = self.bank.state_dict()
        return state if self.prototypes is None else {**state, **self.prototypes.state_dict()}


class _TrainMetrics:
    """Averages the step metrics between log points (one ``clu.metrics.Average`` per key, so any key name works)."""

    def __init__(self):
        self._averages: dict[str, clu.metrics.Average] = {}

    def add(self, metrics: dict[str, jax.Array]) -> None:
        for name, value in metrics.items():
            update = clu.metrics.Average.from_model_output(value)
            self._averages[name] = self._averages[name].merge(update) if name in self._averages else update

    def pop(self) -> dict[str, float]:
        values = {f"train/{k}": float(v.compute()) for k, v in self._averages.items()}
        self._averages = {}
        return values


def _finish_completed(run: Run, evaluators: list[suite.Evaluator], state: TrainState, workdir: str,
                      started: float) -> Results:
    """A run already at ``num_steps``: re-evaluate, and complete its files if it was killed after the last save."""
    step = int(jax.device_get(state.step))
    print(f"Run complete ({step}/{run.config.num_steps} steps); re-evaluating the final checkpoint.", flush=True)
    results = evaluate(run, evaluators, state.params)
    report(results, evaluators, step, final=True)
    if run_files.read_done(workdir) is None:
        if not (epath.Path(workdir) / run_files.RESULTS_FILE).exists():
            _write_results(workdir, step, results)
        _write_done(workdir, step, run.config.num_steps, time.time() - started, {})
    return results


def _write_eval(writer: Any, step: int, results: Results) -> None:
    writer.write_scalars(step, {f"eval/{name}/{k}": v for name, m in results.items() for k, v in m.items()})


def _stopped_early(stop_flag: signals.StopFlag, where: str) -> bool:
    """Whether a SIGTERM/Ctrl-C came before training started (all processes agree): then the run exits cleanly."""
    if not stop_flag.agreed(0, 1)[0]:
        return False
    message = f"{stop_flag.signal_name or 'A stop signal'} received {where}: exiting cleanly (nothing new to save)."
    print(message, flush=True)
    logging.warning("%s", message)
    return True


def _log_precision(name: str) -> None:
    """Says which matmul dtype 'auto' became on this machine (bfloat16 needs native bf16 on a CPU)."""
    line = f"Matmul compute dtype: {precision.resolve_dtype_name(name)} (model.dtype={name!r}, {jax.default_backend()})"
    if precision.YNN_OFF in os.environ.get("XLA_FLAGS", ""):
        line += f"; XLA:CPU YNNPACK fusions off ({precision.OPT_OUT}=0 to keep them)"
    print(line, flush=True)
    logging.info("%s", line)


def _restore(run: Run, ckpt: checkpointing.Checkpointer, data_iter: Any) -> tuple[TrainState, bool]:
    """The latest checkpoint (on any mesh or process count) or the fresh state; says what it restored, and in one
    more line when the checkpoint was written on another topology."""
    restored = ckpt.restore(checkpointing.abstract_like(run.state), data_iter, global_batch_size=run.config.batch_size)
    if restored is None:
        return run.state, False
    message = f"Restored checkpoint at step {restored[1]} from {ckpt.directory}"
    change = elastic.describe_change(ckpt.restore_topology(restored[1]), elastic.topology(run.config, run.mesh))
    for line in [message] + ([change] if change else []) + [f"Elastic resume: {n}" for n in ckpt.notes]:
        print(line, flush=True)
        logging.info("%s", line)
    return restored[0], True


def train_and_evaluate(config: Any, workdir: str, stop_flag: signals.StopFlag | None = None) -> Results:
    """Trains (or resumes) in ``workdir`` and returns the final evaluation results. SIGTERM/Ctrl-C stop the run
    cleanly from the start (``stop_flag``: one the caller installed earlier, e.g. before importing JAX)."""
    started = time.time()
    own_flag = stop_flag is None
    stop_flag = signals.StopFlag() if own_flag else stop_flag  # before the tokenizer trains or anything compiles
    try:
        return _train(config, workdir, stop_flag, started)
    finally:
        if own_flag:
            stop_flag.restore()


def _train(config: Any, workdir: str, stop_flag: signals.StopFlag, started: float) -> Results:
    config = lit.prepare(config, workdir)  # lit.embeddings_from: the teacher-embedded ArrayRecord dataset first
    run = build_run(config, workdir)
    if _stopped_early(stop_flag, "while the run was being built"):
        return {}
    config = run.config
    _log_precision(config.model.dtype)
    writer = writers.create_writers(workdir, just_logging=jax.process_index() != 0)
    evaluators = suite.build_evaluators(config, run.tokenizer, sharding.batch_sharding(run.mesh))
    data_iter = pipeline.make_train_iterator(
        config.data, run.tokenizer, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    ckpt = checkpointing.Checkpointer(run_files.checkpoints_dir(workdir), max_to_keep=config.keep_checkpoints)
    try:
        state, resumed = _restore(run, ckpt, data_iter)
        if not resumed:
            writer.write_hparams({k: str(v) for k, v in _flatten(config.to_dict()).items()})
        step = int(jax.device_get(state.step))
        if step >= config.num_steps:
            return _finish_completed(run, evaluators, state, workdir, started)
        if _stopped_early(stop_flag, "before training started"):
            return {}
        return _loop(run, evaluators, state, step, resumed, ckpt, data_iter, writer, stop_flag, workdir, started)
    finally:
        data_iter.close()  # stops Grain worker processes, if any
        ckpt.close()  # a failed save was raised already (ckpt.wait); closing never hides the error in flight
        writer.flush()


def _loop(run: Run, evaluators: list[suite.Evaluator], state: TrainState, step: int, resumed: bool,
          ckpt: checkpointing.Checkpointer, data_iter: Any, writer: Any, stop_flag: signals.StopFlag,
          workdir: str, started: float) -> Results:
    """Steps from ``step`` to num_steps (or stop_at_step), with metrics, evaluations and checkpoints; a failed
    checkpoint save stops it at once (`checkpointing.CheckpointSaveError`)."""
    config = run.config
    last = config.num_steps
    end = last if config.stop_at_step <= 0 else min(last, config.stop_at_step)
    memory = _MemoryHook(config, ckpt, step if resumed else None)
    batch_sharding = sharding.batch_sharding(run.mesh)
    topology = elastic.topology(config, run.mesh)
    progress = writers.ProgressReporter(last, writer, every_secs=30)
    train_metrics = _TrainMetrics()
    results: Results = {}
    last_train: dict[str, float] = {}
    stopping = False
    while step < end and not stopping:
        batch = pipeline.to_global_batch(memory.before(next(data_iter), step), batch_sharding)
        state, metrics, host = run.train_step(state, batch)
        memory.after(host, step)
        step += 1
        train_metrics.add(metrics)
        progress(step, examples=config.batch_size)
        if step % config.log_every == 0 or step == end:
            _check_finite(state, ckpt, step)
            last_train = train_metrics.pop()
            writer.write_scalars(step, last_train)
            data_metrics = pipeline.data_metrics()  # data/skipped/<reason>, data/caption_noise/*, ...
            if data_metrics:
                writer.write_scalars(step, data_metrics)
        due = [ev for ev in evaluators if ev.every > 0 and ev.due(step, last) and step != last]
        if due:
            with progress.timed("eval"):
                partial = evaluate(run, due, state.params)
            _write_eval(writer, step, partial)
            report(partial, due, step)
        stopping, save_failed = stop_flag.agreed(step, config.log_every, ckpt.save_failed())
        if save_failed:  # the first failed save stops the run, before the next one is attempted
            ckpt.raise_failure()
        if step % config.checkpoint_every == 0 or step == end or stopping:
            _check_finite(state, ckpt, step)
            with progress.timed("checkpoint"):
                ckpt.save(step, state, data_iter, force=True, memory=memory.state_dict(), topology=topology)
    if step >= last:
        with progress.timed("eval"):
            results = evaluate(run, evaluators, state.params)
        _write_eval(writer, step, results)
        report(results, evaluators, step, final=True)
    ckpt.wait()  # raises CheckpointSaveError if the last save failed: then neither results nor done.json
    if step >= last:
        _write_results(workdir, step, results)
        _write_done(workdir, step, last, time.time() - started, last_train)
    return results


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
