"""Benchmarks of the engine and the service, each a module run from the repository root:

    python -m bench.savings      # does growing save compute? (the LiGO paper's Table 1, small)
    python -m bench.fit_sweep    # what fitting the operator buys, per step count and rate
    python -m bench.symmetry     # do copied units part in training?
    python -m bench.grow_bench   # what growing GPT-2 124M -> 355M costs (time, memory)
    python -m bench.mlm_head     # scoring a masked LM's head on masked tokens only
    python -m bench.allocator    # malloc keeping freed memory: time per CPU step
    python -m bench.api_load     # the API under 100 clients, and a 1 GiB upload

``bench.common`` holds what they share (sizes, data, the small model, FLOPs, the machine);
``bench.report`` turns the savings runs' curves into records, tables and a plot.
Results and commands: docs/BENCHMARKS.md.
"""
