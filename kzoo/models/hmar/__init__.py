"""HMAR: the multi-scale residual VQ-VAE tokenizer (the transformer and sampler land later)."""
from .vqvae import (VQVAE, MultiScaleQuantizer, VQVAEOutput, load_official, phi_index, vqvae_f16_4096,
                    vqvae_mnist)

__all__ = ["VQVAE", "MultiScaleQuantizer", "VQVAEOutput", "load_official", "phi_index", "vqvae_f16_4096",
           "vqvae_mnist"]
