"""Training one model: the engine (:mod:`.engine`), checkpoints (:mod:`.checkpoint`) and
resuming a stage that was cut off (:mod:`.resume`)."""
