"""cdd-ray: constrained diffusion models trained by dual training, on Ray (see README.md)."""
