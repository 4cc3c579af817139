"""Evaluate a checkpoint: held-out preference metrics, generations, reward-vs-KL (issue: evaluate.py)."""

import sys

if __name__ == "__main__":
    sys.exit("evaluate.py is not implemented yet: it lands with the evaluation issue. "
             "Held-out preference metrics are already logged during training as eval/* in metrics.jsonl.")
