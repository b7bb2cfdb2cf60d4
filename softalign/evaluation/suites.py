"""Named evaluation suites: ``python -m softalign.evaluate --suite=NAME``, each a collection of ``config.evals``
entries defined here and nowhere else.

  synthetic   the procedural scenes: held-out retrieval; zero-shot colour, shape, size and position.
  retrieval   the run's held-out split; Flickr8k val with ``--flickr8k_dir``.
  zeroshot    synthetic colour and shape; CIFAR-10 with ``--cifar10_dir``.
  robustness  zero-shot colour and shape on single-object scenes (reference) and on cluttered multi-object scenes
              (shifted, labelled by their first object); CIFAR-10 with ``--cifar10_dir`` (no shifted set of it
              here). Its `robustness_pairs` feed the robustness report.

Every entry also says which ``task`` it is and which ``dataset`` it reads (`describe`), for the one-record-per-
metric results file.
"""

from __future__ import annotations

from typing import Any, Optional

SUITES = {
    "synthetic": "held-out retrieval and zero-shot colour/shape/size/position on the synthetic scenes",
    "retrieval": "image-text retrieval: the run's held-out split, Flickr8k val (--flickr8k_dir)",
    "zeroshot": "zero-shot classification: synthetic colour and shape, CIFAR-10 (--cifar10_dir)",
    "robustness": "zero-shot accuracy on single-object scenes vs cluttered scenes (reference vs shifted)",
}
TASKS = {"zeroshot": "zeroshot", "synthetic_zeroshot": "zeroshot", "retrieval": "retrieval",
         "linear_probe": "linear_probe", "nmtune": "nmtune"}


def _synthetic_zeroshot(attribute: str, single_object: bool = True, num: int = 1000) -> dict[str, Any]:
    dataset = dict(type="synthetic", attribute=attribute, num_examples=num, single_object=single_object,
                   name=f"synthetic_{attribute}" + ("" if single_object else "_cluttered"))
    if not single_object:
        dataset.update(max_objects=4, seed_offset=0x5EED)
    return dict(kind="zeroshot", dataset=dataset)


def suite_evals(name: str, *, cifar10_dir: str = "", flickr8k_dir: str = "", max_examples: int = 0
                ) -> dict[str, dict[str, Any]]:
    """The evaluators of suite `name` (ValueError naming the known suites for another name)."""
    limit = max_examples if max_examples and max_examples > 0 else None
    cifar = dict(kind="zeroshot", dataset=dict(type="folder", path=cifar10_dir, name="cifar10", max_examples=limit))
    if name == "synthetic":
        evals = {"heldout": dict(kind="retrieval", split="heldout")}
        evals.update({attr: _synthetic_zeroshot(attr) for attr in ("color", "shape", "size", "position")})
    elif name == "retrieval":
        evals = {"heldout": dict(kind="retrieval", split="heldout")}
        if flickr8k_dir:
            evals["flickr8k_val"] = dict(kind="retrieval", dataset=dict(
                type="captions", path=flickr8k_dir, split="val", name="flickr8k-val", max_examples=limit))
    elif name == "zeroshot":
        evals = {attr: _synthetic_zeroshot(attr) for attr in ("color", "shape")}
        if cifar10_dir:
            evals["cifar10"] = cifar
    elif name == "robustness":
        evals = {}
        for attr in ("color", "shape"):
            evals[attr] = _synthetic_zeroshot(attr)
            evals[f"{attr}_cluttered"] = _synthetic_zeroshot(attr, single_object=False)
        if cifar10_dir:
            evals["cifar10"] = cifar
    else:
        raise ValueError(f"unknown suite {name!r}; known suites: {', '.join(sorted(SUITES))}")
    return evals


def robustness_pairs(name: str, evals: dict[str, Any]) -> list[str]:
    """``ID:SHIFT`` evaluator pairs of the suite for the robustness report (only the robustness suite has any)."""
    if name != "robustness":
        return []
    return [f"{attr}:{attr}_cluttered" for attr in ("color", "shape") if f"{attr}_cluttered" in evals]


def describe(name: str, options: Any) -> tuple[str, str]:
    """``(task, dataset)`` of an evaluator entry: the task from its kind, the dataset from its spec's name (else
    its type and path or split)."""
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    kind = options.get("kind", "")
    task = TASKS.get(kind, kind)
    if kind == "synthetic_zeroshot":
        return task, f"synthetic_{options.get('attribute') or 'color'}"
    spec = options.get("dataset") or options.get("test") or {}
    if spec:
        label = spec.get("name") or spec.get("path") or spec.get("type", "")
        if spec.get("type") == "synthetic" and not spec.get("name"):
            label = f"synthetic_{spec.get('attribute') or spec.get('split') or 'heldout'}"
        return task, str(label)
    return task, str(options.get("split") or name)


def select_evals(config: Any, extra: Optional[dict[str, Any]] = None, only: Optional[list[str]] = None,
                 include_config: bool = True) -> dict[str, Any]:
    """``config.evals`` (unless not ``include_config``) updated with ``extra`` (name -> options), restricted to
    ``only``; ValueError when none is left or ``only`` names an unknown evaluator."""
    evals: dict[str, Any] = dict(config.evals.to_dict()) if include_config else {}
    evals.update(extra or {})
    if only:
        unknown = sorted(set(only) - set(evals))
        if unknown:
            raise ValueError(f"--only names unknown evaluators {unknown}; known: {sorted(evals)}")
        evals = {k: v for k, v in evals.items() if k in only}
    if not evals:
        raise ValueError("no evaluators to run (config.evals is empty and no extra ones were given)")
    return evals
