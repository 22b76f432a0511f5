"""The library side of the HTTP segmentation server (``serve/app.py`` is the thin Ray Serve layer on top):
settings, the engine (bundle model + priors + batched prediction), online prior tracking, answer encoding.
Imports neither ray nor fastapi."""
from labelshift.serving.engine import Segmentation, SegmentationEngine
from labelshift.serving.online import OnlinePriorTracker
from labelshift.serving.settings import (OnlineSettings, ParameterError, PriorUserConfig, SegmentOptions,
                                         ServeSettings)

__all__ = ["OnlinePriorTracker", "OnlineSettings", "ParameterError", "PriorUserConfig", "SegmentOptions",
           "Segmentation", "SegmentationEngine", "ServeSettings"]
