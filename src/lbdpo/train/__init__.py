"""Training: the loop (:mod:`.trainer`), checkpoints and exact resume (:mod:`.checkpoint`), run output
(:mod:`.run_logging`), precomputed reference log-probs (:mod:`.reference`)."""
