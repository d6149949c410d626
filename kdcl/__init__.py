"""kdcl: knowledge distillation with curriculum learning, as staged, config-driven runs."""

from kdcl import clock  # noqa: F401  (registers the ${kdcl_now:...} resolver the configs use)

__version__ = "0.1.0"
