"""The one tolerance table of the test suite (DESIGN.md §4)."""

LAYER_ATOL = 1e-5        # rms_norm, rope, attention, moe block vs HF torch modules (float32)
LOGITS_ATOL = 1e-4       # whole tiny model vs HF MixtralForCausalLM (float32)
CACHE_ATOL = 1e-5        # cached decode vs our own uncached forward (float32)
STRATEGY_ATOL = 1e-5     # every MoE strategy vs the dense oracle (float32)
GRAD_TOL = 1e-4          # gradients of two exact implementations (float32; atol and rtol)
AUX_ATOL = 1e-6          # load-balancing loss vs HF load_balancing_loss_func
KERNEL_RTOL = 1e-5       # CPU kernels vs the pure-JAX path (float32 sums; relative to the largest output)
# int8 CPU kernels with one activation row on AVX2 round that row to int16 in blocks of 64
# (within 2^-16 of each block's largest value; mixtral_jax/kernels): against the pure path ~2e-5 of
# the largest output of one product and 4e-4 on test_kernels' model's logits, where rounding the
# weights to int8 moves those logits by 0.13.
INT8_ROW_RTOL = 1e-4     # one product, relative to the largest output
INT8_LOGITS_ATOL = 2e-3  # whole model, kernels vs the pure path, int8 weights
BF16_ROUND_RTOL = 2.0 ** -8  # a float32 result rounded to bfloat16 (8 significant bits), relative to the largest
