"""HMAR: the multi-scale residual VQ-VAE tokenizer, the next-scale transformer with its masked-prediction
branch, and the sampler."""
from .hmar import (KVCache, NextScaleTransformer, from_official_layout, hmar_d16, hmar_d20, hmar_d24, hmar_d30,
                   hmar_mnist, to_official_layout, var_d16, var_d20, var_d24, var_d30)
from .sampling import DEFAULT_MASK_SCHEDULE, check_mask_schedule, default_mask_schedule, filter_logits, sample
from .vqvae import (VQVAE, MultiScaleQuantizer, VQVAEOutput, load_official, phi_index, vqvae_f16_4096,
                    vqvae_mnist)

#: The tokenizer entry points by name, as checkpoints record them ("model" in ``model_config()``).
VQVAE_MODELS = {"vqvae_mnist": vqvae_mnist, "vqvae_f16_4096": vqvae_f16_4096}
#: The transformer entry points by name.
TRANSFORMER_MODELS = {"hmar_mnist": hmar_mnist, "hmar_d16": hmar_d16, "hmar_d20": hmar_d20, "hmar_d24": hmar_d24,
                      "hmar_d30": hmar_d30, "var_d16": var_d16, "var_d20": var_d20, "var_d24": var_d24,
                      "var_d30": var_d30}

__all__ = ["VQVAE", "VQVAE_MODELS", "TRANSFORMER_MODELS", "MultiScaleQuantizer", "NextScaleTransformer", "KVCache",
           "VQVAEOutput", "load_official", "phi_index", "vqvae_f16_4096", "vqvae_mnist", "hmar_d16", "hmar_d20",
           "hmar_d24", "hmar_d30", "hmar_mnist", "var_d16", "var_d20", "var_d24", "var_d30", "from_official_layout",
           "to_official_layout", "DEFAULT_MASK_SCHEDULE", "check_mask_schedule", "default_mask_schedule",
           "filter_logits", "sample"]
