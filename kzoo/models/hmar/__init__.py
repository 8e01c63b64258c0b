"""HMAR: the multi-scale residual VQ-VAE tokenizer and the next-scale transformer (the masked
stage and the sampler land later)."""
from .hmar import (NextScaleTransformer, hmar_d16, hmar_d20, hmar_d24, hmar_d30, hmar_mnist, var_d16, var_d20,
                   var_d24, var_d30)
from .vqvae import (VQVAE, MultiScaleQuantizer, VQVAEOutput, load_official, phi_index, vqvae_f16_4096,
                    vqvae_mnist)

#: The tokenizer entry points by name, as checkpoints record them ("model" in ``model_config()``).
VQVAE_MODELS = {"vqvae_mnist": vqvae_mnist, "vqvae_f16_4096": vqvae_f16_4096}

__all__ = ["VQVAE", "VQVAE_MODELS", "MultiScaleQuantizer", "NextScaleTransformer", "VQVAEOutput", "load_official",
           "phi_index", "vqvae_f16_4096", "vqvae_mnist", "hmar_d16", "hmar_d20", "hmar_d24", "hmar_d30", "hmar_mnist",
           "var_d16", "var_d20", "var_d24", "var_d30"]
