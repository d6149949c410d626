"""kdcl: knowledge distillation with curriculum learning, as staged, config-driven runs."""

__version__ = "0.1.0"
