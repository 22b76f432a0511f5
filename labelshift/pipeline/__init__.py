"""The main job's stages, manifests and training runners (Ray is imported only by :class:`RayTrainRunner`)."""
from labelshift.pipeline.job import ALL_STAGES, Pipeline
from labelshift.pipeline.runners import LocalTrainRunner, RayTrainRunner

__all__ = ["ALL_STAGES", "Pipeline", "LocalTrainRunner", "RayTrainRunner"]
