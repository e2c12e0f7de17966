"""What megatron-core 0.19.2 lacks or gets wrong for GLM-5, as small modules plugged in by spec (docs/MODEL.md,
"DSA attention", says for each what megatron-core lacks; --dsa-kernel-backend none/tilelang/cudnn builds
megatron-core's own GLM-5 attention instead, with the same parameters).

GLM-5 specifics handled here (the D-numbers are sections of docs/HF_MAPPING.md):
- The DSA indexer reads the *normalized* query latent (D1): the spec uses a separate
  `q_layernorm` module, and this package's indexer takes `qr` after it.
- q_a/kv_a layernorms and the indexer's k_norm use eps 1e-6 as in HF (D2): `fixed_eps_norm`.
- The indexer is megatron-core's DSAIndexer (RoPE dims first, as HF) without its Hadamard rotation
  (HF has none; q.k is invariant under it; it needs a CUDA-only package).
- The indexer-loss tracker counts the MTP layer after the decoder layers (megatron-core numbers its inner
  layer 1: `layer_number_offset`).
- The local (CPU) RMSNorm supports sequence parallelism (megatron's torch norm asserts against it).
"""
