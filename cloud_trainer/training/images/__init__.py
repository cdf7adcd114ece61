"""The image family's parts (registered as ``image`` in :mod:`cloud_trainer.training.families`).

- :mod:`cloud_trainer.training.images.data`           image folders and tables of image paths, the split, the data hash
- :mod:`cloud_trainer.training.images.preprocessing`  the bundle's preprocessing from the image processor, the
  device's decode and normalisation, augmentation
- :mod:`cloud_trainer.training.images.train`          fine-tuning with the Hugging Face Trainer
- :mod:`cloud_trainer.training.images.runs`           a run on disk, its export (:mod:`export.image`) and its evaluation
"""
