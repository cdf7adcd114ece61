"""cloud-train: the ML engineer's side of edgeloop.

One subpackage per part of the cloud side; arrows point one way (``cli`` and ``demo`` on top,
``errors`` at the bottom):

- :mod:`cloud_trainer.training`  data sets, the training plan, fine-tuning, evaluation, ``import``,
  and the model families (``training.families``: text, digits, ``training.images``)
- :mod:`cloud_trainer.releases`  the model registry, release keys and signing, push, chunk GC
- :mod:`cloud_trainer.fleet`     the broker's PKI and device provisioning, the fleet view, rollouts,
  the web dashboard (``fleet.dashboard``)
- :mod:`cloud_trainer.samples`   the sample collector, the sample store, labelling export and import
- :mod:`cloud_trainer.cli`       the ``cloud-train`` command (one module per part)
- :mod:`cloud_trainer.demo`      the end-to-end demo and its broker on localhost; the product imports
  it only in ``cloud-train demo``
- :mod:`cloud_trainer.errors`    the error tree every part raises

``training`` and ``fleet`` import ``releases``, which imports none of the others; ``samples`` and
``training`` meet at one point (labelled samples as training data, ``--include-samples``).
May import :mod:`export` and :mod:`edge_agent.protocol`; the edge never imports this package.
"""

__version__ = "0.1.0"
