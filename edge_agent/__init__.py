"""edge-agent: the on-device daemon of edgeloop.

Subsystems, each in its own module, meet only in :mod:`edge_agent.app` (the composition root):

- :mod:`edge_agent.protocol`  the wire contract (topics, manifest, release, state)
- :mod:`edge_agent.config`    typed TOML configuration
- :mod:`edge_agent.transport` the MQTT client wrapper
- :mod:`edge_agent.store`     versions on disk and the atomic active pointer
- :mod:`edge_agent.fetch`     bundle download over MQTT chunks
- :mod:`edge_agent.updater`   the update state machine
- :mod:`edge_agent.runtime`   onnxruntime sessions with pre/post-processing
- :mod:`edge_agent.serving`   the local HTTP API (Open Inference Protocol), batching, metrics

Nothing here imports torch, transformers, optimum or onnx (tests/edge_agent/test_edge_imports.py).
"""

__version__ = "0.1.0"
