"""The sweep launcher: runs every unfinished run of a grid as ``python -m softalign.main`` subprocesses.

Each run trains in ``ROOT/<run name>`` (its own Orbax checkpoints, so a killed run resumes where it stopped) with
stdout/stderr appended to ``ROOT/<run name>/log.txt``; each attempt (command, exit code, wall seconds) is added to
``ROOT/<run name>/launch.json``. A run is finished when ``train.py`` has written its ``done.json`` for the same
``num_steps``; finished runs are skipped, so relaunching a killed sweep runs only what is missing. A failed run is
reported (exit code, last log lines) and the others go on; the launcher then exits with status 1.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from softalign.sweep import plan

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_POLL_SECONDS = 0.2


@dataclasses.dataclass
class Job:
    """One run to launch: its name, workdir, command and (once started) process and timing."""

    name: str
    workdir: str
    command: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    returncode: int | None = None
    seconds: float = 0.0


def child_env(base: Mapping[str, str] | None = None, compilation_cache: str = "") -> dict[str, str]:
    """The environment of a run: ``base`` (default os.environ) with this project first on PYTHONPATH, so
    ``softalign`` and the sweep file's imports resolve from any working directory, and, unless ``base`` sets one,
    JAX's persistent compilation cache in ``compilation_cache``: runs that differ only in data or loss values (noise,
    fraction, seed, alpha) then compile their step once between them."""
    env = dict(os.environ if base is None else base)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([_PROJECT_ROOT] + [p for p in parts if p != _PROJECT_ROOT])
    if compilation_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
        env["JAX_COMPILATION_CACHE_DIR"] = compilation_cache
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    return env


def tail(path: str, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file (reads at most its last 64 kB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def record_attempt(job: Job) -> None:
    """Appends this attempt (start time, seconds, exit code, command) to the run's launch.json."""
    path = os.path.join(job.workdir, plan.LAUNCH_FILE)
    data = plan.read_json(path) or {"attempts": []}
    data["attempts"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(job.started)),
                             "seconds": round(job.seconds, 3), "returncode": job.returncode,
                             "command": job.command})
    staged = path + ".tmp"
    with open(staged, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(staged, path)


def _start(job: Job, env: Mapping[str, str]) -> None:
    """Starts ``job`` with its output appended to its log.txt, after a header line naming the attempt."""
    os.makedirs(job.workdir, exist_ok=True)
    log = open(os.path.join(job.workdir, plan.LOG_FILE), "a")
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} softalign.sweep: {shlex.join(job.command)}\n")
    log.flush()
    job.started = time.time()
    # A session of its own: Ctrl-C reaches the launcher only, which then stops each run once, with SIGTERM.
    job.process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                   start_new_session=True)
    log.close()


def run_jobs(jobs: Sequence[Job], parallel: int, env: Mapping[str, str], out: TextIO) -> list[Job]:
    """Runs ``jobs``, at most ``parallel`` at a time; reports each as it ends. On SIGTERM/Ctrl-C it stops the
    running ones with SIGTERM (each saves a checkpoint) and re-raises KeyboardInterrupt."""
    queue = collections.deque(jobs)
    running: list[Job] = []
    done: list[Job] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while queue or running:
            while queue and len(running) < max(1, parallel):
                job = queue.popleft()
                _start(job, env)
                running.append(job)
                print(f"[start] {job.name}", file=out, flush=True)
            time.sleep(_POLL_SECONDS)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                _finish(job)
                done.append(job)
                _report(job, len(done), len(jobs), out)
    except KeyboardInterrupt:
        print(f"[interrupted] stopping {len(running)} running run(s); relaunch to resume", file=out, flush=True)
        for job in running:
            job.process.send_signal(signal.SIGTERM)
        for job in running:
            try:
                job.process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
            _finish(job)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return done


def _raise_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler: stop the launcher as Ctrl-C does, so running runs are stopped cleanly."""
    raise KeyboardInterrupt


def _finish(job: Job) -> None:
    """Records an ended job's exit code and wall seconds in the job and in its launch.json."""
    job.returncode = job.process.returncode
    job.seconds = time.time() - job.started
    record_attempt(job)


def _report(job: Job, index: int, total: int, out: TextIO) -> None:
    """One line per ended run; a failed one adds its exit code and the last lines of its log."""
    if job.returncode == 0:
        print(f"[done {index}/{total}] {job.name}: ok in {job.seconds:.1f} s", file=out, flush=True)
        return
    log = os.path.join(job.workdir, plan.LOG_FILE)
    print(f"[done {index}/{total}] {job.name}: FAILED with exit code {job.returncode} after {job.seconds:.1f} s; "
          f"last lines of {log}:", file=out, flush=True)
    print("    " + tail(log).replace("\n", "\n    "), file=out, flush=True)


def cluster_command(job: Job) -> str:
    """One shell line that runs ``job`` on any machine that sees this checkout and ROOT: mkdir, this project on
    PYTHONPATH, ``python -m softalign.main ...`` with its output appended to the run's log.txt."""
    log = os.path.join(job.workdir, plan.LOG_FILE)
    command = ["python"] + job.command[1:]
    return (f"mkdir -p {shlex.quote(job.workdir)} && cd {shlex.quote(os.getcwd())} && "
            f"PYTHONPATH={shlex.quote(_PROJECT_ROOT)}${{PYTHONPATH:+:$PYTHONPATH}} {shlex.join(command)} "
            f">> {shlex.quote(log)} 2>&1")


def launch(sweep_file: str, root: str, *, parallel: int = 1, dry_run: bool = False, print_commands: bool = False,
           only: Sequence[str] = (), extra: Sequence[str] = (), args: Mapping[str, Any] | None = None,
           compilation_cache: str | None = None, python: str = sys.executable,
           env: Mapping[str, str] | None = None, out: TextIO = sys.stdout) -> int:
    """Resolves the grid, writes ROOT/sweep.json (not on ``dry_run``), then runs, lists (``dry_run``) or prints
    (``print_commands``) every unfinished run whose name contains one of ``only``. ``compilation_cache``: JAX's
    persistent cache folder for the runs (None: ROOT/jax_cache; '': none). Returns the exit status."""
    args = dict(args or {})
    sweep_file, root = os.path.abspath(sweep_file), os.path.abspath(root)
    module = plan.load_module(sweep_file)
    base = module.get_config()
    runs = plan.resolve(plan.call_get_sweep(module, args), base)
    if not runs:
        raise plan.PlanError(f"{sweep_file}: get_sweep() returned no runs")
    values = plan.variables(runs, base)
    if not dry_run:
        plan.write_sweep_json(root, sweep_file, args, extra, runs, values)
    selected = [r for r in runs if not only or any(s in r.name for s in only)]
    cache = os.path.join(root, "jax_cache") if compilation_cache is None else compilation_cache
    env = child_env(env, os.path.abspath(cache) if cache else "")
    jobs, finished = [], []
    for run in selected:
        workdir = os.path.join(root, run.name)
        status = plan.run_status(workdir, plan.expected_num_steps(base, run.overrides, extra))
        if status == "finished":
            finished.append(run.name)
            continue
        jobs.append(Job(run.name, workdir, plan.run_command(python, sweep_file, workdir, run.overrides, extra)))
        if dry_run:
            print(f"[{status}] {run.name}: {shlex.join(jobs[-1].command)}", file=out)
    comment = "# " if print_commands else ""   # the listing stays a valid shell script
    print(f"{comment}sweep {os.path.basename(sweep_file)}: {len(runs)} runs in the grid, {len(selected)} selected, "
          f"{len(finished)} finished (skipped), {len(jobs)} to run -> {root}", file=out, flush=True)
    if dry_run:
        return 0
    if print_commands:
        for job in jobs:
            print(cluster_command(job), file=out)
        return 0
    try:
        done = run_jobs(jobs, parallel, env, out)
    except KeyboardInterrupt:
        return 130
    failed = [j for j in done if j.returncode != 0]
    total = sum(j.seconds for j in done)
    print(f"sweep: {len(done) - len(failed)} run(s) ok, {len(failed)} failed, {len(finished)} already finished; "
          f"{total:.1f} s of run time", file=out, flush=True)
    for job in failed:
        print(f"  FAILED {job.name} (exit code {job.returncode}): see {os.path.join(job.workdir, plan.LOG_FILE)}",
              file=out)
    return 1 if failed else 0
