"""What megatron-core 0.16.1 lacks or gets wrong for GLM-5, as small modules plugged in by spec.

GLM-5 specifics handled here (the D-numbers are sections of docs/HF_MAPPING.md):
- The DSA indexer reads the *normalized* query latent (D1): the spec uses a separate
  `q_layernorm` module, and this package's indexer takes `qr` after it.
- q_a/kv_a layernorms and the indexer's k_norm use eps 1e-6 as in HF (D2): `fixed_eps_norm`.
- No Hadamard rotation in the indexer (HF has none; q.k is invariant under it; it needs a
  CUDA-only package), and the indexer loss is skipped when its coefficient is 0 (megatron computes
  a full fp32 [b, heads, s, s] KL at 0.0).
- The indexer-loss tracker counts the MTP layer (megatron sizes it by num_layers: IndexError).
- The local (CPU) RMSNorm supports sequence parallelism (megatron's torch norm asserts against it).
"""
