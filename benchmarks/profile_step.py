"""Where a CPU train step's time goes: a ``jax.profiler`` trace of softalign's step, grouped by what each op does.

    python benchmarks/profile_step.py                                   # tiny model, 64 px, batch 64
    python benchmarks/profile_step.py --model=b16 --size=224 --batch=8 --steps=2
    python benchmarks/profile_step.py --overrides='{"model.dtype": "float32"}'

It builds the same step as ``benchmarks/vs_open_clip.py`` (softalign's defaults, CLIP loss), traces ``--steps``
steps after a warm-up, and sums the duration of every XLA:CPU thunk by the HLO instruction it runs. Each
instruction is put in one class by reading the compiled HLO: matmuls (``dot``, or a fusion around one),
converts (fusions that only change dtype), transposes and copies (layout changes), reductions, other element-wise
fusions, and the rest. Shares are of summed thread time, so they add to 100% whatever the thread count.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from vs_open_clip import MODELS, SoftalignWorker, cpu_flags, cpu_model  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(")


def classify_hlo(hlo_text: str) -> dict[str, str]:
    """Instruction name -> class, from compiled HLO text: a fusion is classed by the ops in its body."""
    bodies: dict[str, list[str]] = {}
    current = None
    top: dict[str, tuple[str, str]] = {}  # instruction -> (opcode, called computation)
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) [\(\{]", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            bodies[current] = []
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            bodies[current].append(m.group(2))
            called = re.search(r"calls=%?([\w.\-]+)", line)
            top[m.group(1)] = (m.group(2), called.group(1) if called else "")
    classes = {}
    for name, (op, called) in top.items():
        ops = set(bodies.get(called, [])) if op == "fusion" else {op}
        classes[name] = _class_of(ops)
    return classes


def _class_of(ops: set[str]) -> str:
    if ops & {"dot", "convolution", "custom-call"}:
        return "matmul"
    if ops & {"reduce", "reduce-window"}:
        return "reduce"
    if ops <= {"convert", "parameter", "bitcast", "copy", "transpose", "reshape", "broadcast", "constant", "tuple",
               "get-tuple-element", "slice", "concatenate"}:
        if "transpose" in ops or "copy" in ops:
            return "transpose/copy"
        if "convert" in ops:
            return "convert"
        return "layout/slice"
    if ops & {"all-reduce", "all-gather", "collective-permute"}:
        return "collective"
    return "elementwise"


def profile(args: argparse.Namespace) -> tuple[collections.Counter, collections.Counter, dict, float]:
    """(thread ns by instruction, thread ns by class, instruction -> class, traced seconds per step)."""
    w = SoftalignWorker(MODELS[args.model], args.size, args.batch, json.loads(args.overrides))
    classes = classify_hlo(w.step.lower(w.state, w.batch).compile().as_text())
    w.run(1)
    logdir = tempfile.mkdtemp(prefix="softalign_profile_")
    with jax.profiler.trace(logdir):
        seconds = w.run(args.steps)
    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
    by_op, by_class = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                name = event.name.split(":")[0].strip()
                if name not in classes:
                    continue
                by_op[name] += event.duration_ns
                by_class[classes[name]] += event.duration_ns
    return by_op, by_class, classes, seconds / args.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--only", default="", help="list the top instructions of this class only")
    p.add_argument("--overrides", default="{}", help="softalign config overrides as JSON")
    args = p.parse_args()
    by_op, by_class, classes, step_s = profile(args)
    total = sum(by_class.values()) or 1
    busy = total / 1e9 / args.steps
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores; {cpu_flags()}); model {args.model}, {args.size} px, batch "
          f"{args.batch}, overrides {args.overrides}; step {1e3 * step_s:.1f} ms (traced); thread time "
          f"{1e3 * busy:.1f} ms a step, so {busy / step_s:.2f} cores busy on average\n")
    print("| class | share of thread time |\n|---|---|")
    for name, ns in by_class.most_common():
        print(f"| {name} | {100 * ns / total:.1f}% |")
    print("\n| top instructions | class | share |\n|---|---|---|")
    ops = [(n, ns) for n, ns in by_op.most_common() if not args.only or classes[n] == args.only]
    for name, ns in ops[:args.top]:
        print(f"| {name} | {classes[name]} | {100 * ns / total:.1f}% |")
    print(f"\ncommand: python benchmarks/profile_step.py {' '.join(sys.argv[1:])}")

if __name__ == "__main__":
    main()
