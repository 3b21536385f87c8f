"""lmsi_jax: Large Language Models Can Self-Improve (Huang et al.), JAX/TPU-native."""

__version__ = "0.1.0"
