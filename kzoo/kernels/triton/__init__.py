"""Triton kernels and their launchers. Imported lazily: ``TRITON_INTERPRET`` is read at import."""
