"""Ray glue shared by the main job and the other entry points (sweeps, soft labels): training runners today,
Ray Data passes next. Ray is imported lazily, inside the Ray runners, so this package imports without it."""
from labelshift.runners.train import LocalTrainRunner, RayTrainRunner, run_interruptibly

__all__ = ["LocalTrainRunner", "RayTrainRunner", "run_interruptibly"]
