"""Samples back from the fleet: collected, stored, labelled, and given to the next fine-tune.

- :mod:`~cloud_trainer.samples.collect`    the collector: MQTT 5 shared subscription, PUBACK after storing
- :mod:`~cloud_trainer.samples.store`      the sample store: Parquet parts and a SQLite index with labels
- :mod:`~cloud_trainer.samples.labelling`  CSV and Label Studio export and import; labelled texts and images
"""
