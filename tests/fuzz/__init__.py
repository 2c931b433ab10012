"""Property-based fuzzing of the public ops against the float64 reference (issue 10).

What is fuzzed (strategies in ``strategies.py``):

* ``prefix_attention`` (``test_fuzz_attention.py``): B, Hq, Hkv (GQA/MQA ratios 1-4),
  ragged L, S >= L, P (0 included), D (1, odd and 80/96/112 included); every prefix
  form (none, shared ``[Hkv, P, D]``, per-row, multi-task with int64 / int32 / strided
  ``prefix_index``); layouts per tensor: contiguous, ``[B, L, H, D]`` transposed,
  stride 0 (``expand``) over batch or heads, non-unit last-dim stride; causal;
  key-padding masks with random holes and dead rows; magnitudes from 1e-3 to large
  (peaked softmax); explicit softmax scales; float32 / float16 / bfloat16.  Checked:
  out, lse and every gradient against the float64 reference under the DESIGN §4 rule
  (``softprompt_kernels.testing``), outputs poisoned first where the backend allows.
  Separately (torch backend): NaN/inf injected into visible and masked positions
  (visible -> the same NaN pattern as the reference; masked -> contributes nothing).
* ``prefix_mlp`` (``test_fuzz_mlp.py``): P, E, H1, layers, heads, D, activation, bias,
  dtype, transposed / strided weights.
* ``PrefixEncoder`` (``test_fuzz_encoder.py``): shapes, projection on/off, activation,
  dtype incl. float64; random sequences of parameter writes (``.data`` included)
  interleaved with eval calls: the cached output always equals a fresh computation.

Budgets.  The default profile ``ci`` (registered and loaded by ``tests/conftest.py``) is
deadline-free and derandomized (the same examples on every run, so CI is not flaky);
per test it runs ``TORCH_EXAMPLES`` torch-backend examples and ``TRITON_EXAMPLES``
Triton-interpreter examples (``strategies.py``), sized so that the whole directory
takes well under 60 s on 2 cores.  Deep runs::

    python -m pytest tests/fuzz --hypothesis-profile=long   # 20x the examples, random seeds
    SOFTPROMPT_FUZZ_PROFILE=long python -m pytest tests     # the same through the environment

A failure prints hypothesis' minimal falsifying case and, through ``note``, a
self-contained repro (``case.repro()``: the shapes, layouts and seed to rebuild the
inputs with ``strategies.build_attention_inputs``).
"""
