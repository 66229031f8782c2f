"""Training and evaluation: datasets, augmentation, assignment, losses, DS-CBSM++ sampler, trainer, COCO evaluator.

Kept empty of imports so that ``aoi val --help`` and ``aoi train --help`` load no torch: import the submodules
(``train.dataset``, ``train.evaluate``, ...) directly.
"""
