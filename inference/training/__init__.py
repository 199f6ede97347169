"""Training and evaluation of models: everything that makes or judges a bundle, nothing the node runs.

Needs the ``training`` extra (scikit-learn, matplotlib, Jinja2: ``pip install '.[training]'``). The
serving path (:mod:`inference` and its modules outside this package) never imports it.

- :mod:`~inference.training.data`: the training data layout, its splits and the canvas cache
- :mod:`~inference.training.pack`: compact copies of the data layout (``model pack-data``)
- :mod:`~inference.training.runtime`, :mod:`~inference.training.augment`: what training loops share
- :mod:`~inference.training.pretrain`: MAE pretraining (``model pretrain``)
- :mod:`~inference.training.adapt`: adapting the encoder together with heads (``model pretrain --init``)
- :mod:`~inference.training.tokens`, :mod:`~inference.training.targets`, :mod:`~inference.training.splits`,
  :mod:`~inference.training.heads_fit`: heads on frozen embeddings (``model fit-heads``)
- :mod:`~inference.training.calibrate`: Platt calibration of binary heads (``model calibrate``)
- :mod:`~inference.training.metrics`, :mod:`~inference.training.evaluate`, :mod:`~inference.training.plots`:
  evaluation (``model evaluate``)
- :mod:`~inference.training.model_card`: the model card for people (``model card``)
"""
