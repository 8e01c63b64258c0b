import torch

# The interpreter computes no bfloat16, so bf16 kernel results are checked on a GPU only
# (bench/gpu_check.sh runs tests/kernels there); without one they are compiled ahead of time only.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
