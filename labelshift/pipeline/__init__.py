"""The main job: one stage table, stage directories with manifests, the results table. Orchestration only."""
from labelshift.pipeline.job import ALL_STAGES, Pipeline

__all__ = ["ALL_STAGES", "Pipeline"]
