"""The benchmark suite behind ``python -m benchmarks.run``: one file per concept.

* ``config``  - the two presets (full, quick) and every knob of the run;
* ``results`` - the result rows (plain JSON-able dicts), the rows a run must produce,
  and the check that refuses an incomplete or non-finite result;
* ``mlp``     - comparison A: MLP 784-500-500-10 on Fashion-MNIST;
* ``lstm``    - comparison B: LSTM POS tagger on UD English EWT;
* ``tp``      - Torch-Pruning baselines (optional dependency);
* ``speed``   - backward-time ratios and onnxruntime speed-ups;
* ``claims``  - the paper's claims and the project goals, judged from the numbers;
* ``report``  - RESULTS.md; ``plots`` - the PNGs.
"""
