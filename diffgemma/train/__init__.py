"""Training: the uniform-state block-diffusion objective and what drives it."""
