"""Adaptive fusion of pretrained representations (Resheff, Lieder, Hope, ICPRAM 2019), end to end.

Frozen pretrained networks (:mod:`.backbones`) turn images of a target data set (:mod:`.data`)
into features, cached on disk; one head per representation plus a thumbnail gate are mixed with
:func:`moefast.mixture` (the layers are in :mod:`moefast.nn.fusion`); :mod:`.experiment` runs the
motivation study, the baselines and the fusion on the same splits, and ``python -m
moefast.fusion`` drives it all. See docs/fusion.md.
"""
