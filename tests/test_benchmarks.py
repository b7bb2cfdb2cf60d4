"""The benchmarks still build and run one step against the current API (they are scripts, not imported by the
package, so nothing else would notice when a refactor breaks them). Tiny shapes: this checks wiring, not speed."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_vs_open_clip_softalign_worker_steps(monkeypatch):
    import vs_open_clip

    monkeypatch.setenv("SOFTALIGN_XLA_DEFAULTS", "0")  # in-process: leave this process's XLA_FLAGS alone

    spec = dict(vision=(32, 1, 2, 8), text=(32, 1, 2), embed=16, vocab=64, context=8)
    w = vs_open_clip.SoftalignWorker(spec, 16, 8, {"model.dtype": "float32"})  # 8: one row per test device
    assert w.run(1) > 0 and w.flops > 0 and w.dtype == "float32"


def test_vs_open_clip_open_clip_worker_steps():
    pytest.importorskip("open_clip")
    import vs_open_clip

    spec = dict(vision=(32, 1, 2, 8), text=(32, 1, 2), embed=16, vocab=64, context=8)
    w = vs_open_clip.OpenClipWorker(spec, 16, 4, "fp32")
    assert w.run(1) > 0
    with pytest.raises(ValueError, match="amp_fp16"):
        vs_open_clip.OpenClipWorker(spec, 16, 4, "amp_fp16")


def test_step_overhead_variants_step():
    import step_overhead

    args = step_overhead.parse_args(["--models", "demo", "--batch-demo", "8"])
    c, batch, _ = step_overhead.model_config("demo", args)
    c.model.update(dtype="float32")
    c.model.vision.depth = c.model.text.depth = 1
    variants = step_overhead.build_variants(c, batch, args)
    assert set(variants) == {step_overhead.CLIP, step_overhead.SELF, step_overhead.EMA, step_overhead.MEMORY,
                             step_overhead.FORWARD}
    for v in variants.values():
        v.call()
        v.call()  # twice: the memory variant writes back the first call's embeddings on the second


def test_masking_variants_step():
    import masking

    for aclip in (None, masking.RECIPE):  # FLIP's random mask; A-CLIP's recipe (its heads in the state)
        _, state, _ = masking.build(0.5, masking.TAKE, 8, 0, aclip)
        assert int(state.step) == 1
