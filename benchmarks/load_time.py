"""Time loading the embedded SmolLM2-135M-Instruct: cold (GGUF → dequantize → safetensors cache) and cached.

    python benchmarks/load_time.py            # cold load into a fresh temporary cache, then 3 cached loads

The cold load uses an empty temporary ``LBDPO_CACHE`` so the user's cache is neither used nor touched.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time


from lbdpo.models import load_model_and_tokenizer  # imports (torch, transformers) are not timed


def timed_load() -> float:
    start = time.perf_counter()
    load_model_and_tokenizer({"source": "smollm2_gguf", "dtype": "float32"})
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LBDPO_CACHE"] = cache
        cold = timed_load()
        cached = [timed_load() for _ in range(3)]
    print(f"SmolLM2-135M-Instruct load: cold {cold:.1f} s (GGUF dequantize + write cache); "
          f"cached {statistics.median(cached):.2f} s (median of 3)")


if __name__ == "__main__":
    main()
