"""Per-worker training loops (source-only, Classifier Refinement, self-distillation) that Ray Train's
``TorchTrainer`` runs on many workers and :class:`labelshift.runners.train.LocalTrainRunner` runs in one process."""
