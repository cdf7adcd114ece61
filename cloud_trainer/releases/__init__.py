"""The model registry and releases: what is shipped, signed and published to a fleet.

- :mod:`~cloud_trainer.releases.registry`  immutable registered versions with lineage
- :mod:`~cloud_trainer.releases.signing`   ed25519 release keys and sequence numbers
- :mod:`~cloud_trainer.releases.publish`   pushing a bundle's chunks and its signed release over MQTT
- :mod:`~cloud_trainer.releases.chunk_gc`  clearing retained chunks that no current release needs
"""
