"""Training and model families: from a labelled data set to a bundle in the registry.

- :mod:`~cloud_trainer.training.families`  the family registry (text, digits, image): how each trains,
  exports, evaluates; ``cloud-train train|export|evaluate`` go through it
- :mod:`~cloud_trainer.training.data`      labelled data sets, the stratified split, the packaged data set
  (``data/voice_commands.csv``)
- :mod:`~cloud_trainer.training.plan`      the data summary and every data-driven default with its reason
- :mod:`~cloud_trainer.training.train`     fine-tuning a text classifier with the Hugging Face Trainer
- :mod:`~cloud_trainer.training.fit`       the Trainer's seams: class-weighted loss, early stopping, the budget
- :mod:`~cloud_trainer.training.metrics`   accuracy, macro-F1, per-class scores
- :mod:`~cloud_trainer.training.runs`      a text training run on disk, and its export to a bundle
- :mod:`~cloud_trainer.training.digits`    the digits family: a small CNN on scikit-learn's digits
- :mod:`~cloud_trainer.training.images`    the image family: image data, preprocessing, fine-tuning, runs
- :mod:`~cloud_trainer.training.evaluate`  scoring a bundle, registered version or run on a test set
- :mod:`~cloud_trainer.training.importer`  registering an existing ONNX model or PyTorch module

Nothing heavy is imported at package level: torch and transformers load inside the functions
that train.
"""
