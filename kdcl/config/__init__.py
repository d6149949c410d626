"""The config: its schema (:mod:`.schema`), the readers of ``conf/`` options
(:mod:`.options`) and the checks run before anything trains (:mod:`.checks`)."""

from kdcl.config import schema  # noqa: F401  (registers schema/train, schema/eval, schema/bench with Hydra)
