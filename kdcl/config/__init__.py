"""The config: its schema (:mod:`.schema`), the readers of ``conf/`` options
(:mod:`.options`), the model options Hydra offers as teacher and student (:mod:`.models`)
and the checks run before anything trains (:mod:`.checks`)."""

# Registered with Hydra on import: the teacher and student groups (models) and
# schema/train, schema/eval, schema/bench, schema/export (schema).
from kdcl.config import models, schema  # noqa: F401
