"""Local inference serving: HTTP (Open Inference Protocol and a JSON convenience API), dynamic
batching, and metrics."""

from edge_agent.serving.batcher import Batcher, NoModel, Overloaded
from edge_agent.serving.http import InferenceServer
from edge_agent.serving.metrics import ServingMetrics

__all__ = ["Batcher", "InferenceServer", "NoModel", "Overloaded", "ServingMetrics"]
