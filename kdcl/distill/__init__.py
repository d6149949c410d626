"""Distillation parts that know nothing of runs: the losses, the features they read, the
teachers (ensembles), the step-wise control of α and T, the batch mixes (mixup, CutMix), and
the feeds that give a training step its inputs and its teacher's logits."""
