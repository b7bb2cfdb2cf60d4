"""Objectives and where their soft targets come from: the loss seam (``base``, ``registry``), InfoNCE with PSD
soft targets (``infonce``, ``infonce_chunked``), the alpha ramp and the subset S (``soft_targets``), teachers
(``teachers``) and the memory teacher's host bank (``memory_bank``)."""
