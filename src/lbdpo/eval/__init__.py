"""Evaluation and analysis of trained runs: ``evaluate.py``'s body (:mod:`.evaluate`), its building blocks
(:mod:`.evaluation`: preference metrics, generation, KL, reward), the ground-truth reward (:mod:`.rewards`),
figures (:mod:`.plots`), the sweep comparison (:mod:`.compare`) and prompt statistics (:mod:`.prompt_stats`)."""
