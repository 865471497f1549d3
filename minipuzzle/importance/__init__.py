"""Importance scoring: a score for every layer and every prunable unit of a Nemotron-H checkpoint."""

from minipuzzle.importance.depth import DEPTH_METRICS, depth_scores
from minipuzzle.importance.folder import score_to_folder
from minipuzzle.importance.layerwise import (
    LayerStack,
    ModelStack,
    StreamedStack,
    block_forward,
    iter_layerwise,
    open_stack,
)
from minipuzzle.importance.scores import Scores
from minipuzzle.importance.scoring import score_checkpoint, score_model, score_stack
from minipuzzle.importance.width import width_scores

__all__ = [
    "DEPTH_METRICS",
    "LayerStack",
    "ModelStack",
    "Scores",
    "StreamedStack",
    "block_forward",
    "depth_scores",
    "iter_layerwise",
    "open_stack",
    "score_checkpoint",
    "score_model",
    "score_stack",
    "score_to_folder",
    "width_scores",
]
