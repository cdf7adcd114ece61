"""cloud-train: the ML engineer's side of edgeloop.

- :mod:`cloud_trainer.families`    the model families (text, digits, image): how each trains, exports, evaluates
- :mod:`cloud_trainer.data`        labelled data sets and the stratified split
- :mod:`cloud_trainer.train`       fine-tuning with the Hugging Face Trainer (text)
- :mod:`cloud_trainer.runs`        a training run on disk, and its export to a bundle (text)
- :mod:`cloud_trainer.images`      the image family: image data, preprocessing, fine-tuning, runs
- :mod:`cloud_trainer.signing`     ed25519 release keys and sequence numbers
- :mod:`cloud_trainer.publish`     pushing bundles and signed releases over MQTT
- :mod:`cloud_trainer.chunk_gc`    clearing retained chunks no current release needs
- :mod:`cloud_trainer.localbroker` a broker on localhost for the demo and tests
- :mod:`cloud_trainer.demo`        the whole loop on one machine
- :mod:`cloud_trainer.cli`         the ``cloud-train`` command

May import :mod:`export` and :mod:`edge_agent.protocol`; the edge never imports this package.
"""

__version__ = "0.1.0"
