"""
Benchmarks: nanoMPP side by side with the HF `transformers` reference, in one run, with ratios.

    python bench.py decode     # greedy decode tokens/s: qwen.py vs transformers generate
    python bench.py vision     # ViT + Q-Former forward time
    python bench.py pipeline   # our GPipe/1F1B vs torch.distributed.pipelining
    python bench.py chat       # time to first token and tokens/s for image chat

Timings are medians over repeats after warm-up; ratio > 1.0 means nanoMPP is faster.
"""
import sys
import time
import statistics

import torch


def timeit(fn, repeat=5, warmup=1):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- decode ---

# --- vision ---

# --- pipeline ---

# --- chat ---


if __name__ == "__main__":
    benches = {name[len("bench_"):]: fn for name, fn in globals().items() if name.startswith("bench_")}
    if len(sys.argv) < 2 or sys.argv[1] not in benches:
        sys.exit(f"usage: python bench.py {{{'|'.join(benches) or 'decode|vision|pipeline|chat'}}} [args]")
    torch.manual_seed(0)
    benches[sys.argv[1]](*sys.argv[2:])
