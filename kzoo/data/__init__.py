"""Datasets: MNIST from IDX files as an ImageFolder tree (ImageFolder itself comes from timm)."""
