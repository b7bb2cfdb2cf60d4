"""The training runtime: the jitted step (``step``, ``accumulate``), the optimizer (``optim``), Orbax checkpoints
(``checkpointing``), metric writers (``writers``), what a run is built from (``setup``) and the loop (``train``)."""
