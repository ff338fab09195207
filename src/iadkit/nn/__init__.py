"""Building blocks shared by two or more method families: anomaly-map smoothing, fusion and
image scores (:mod:`.anomaly_maps`), the greedy coreset (:mod:`.coreset`), exact nearest
neighbours (:mod:`.knn`), LafitE's feature editing, which UniAD can use too
(:mod:`.feature_editing`), multi-scale feature alignment (:mod:`.multiscale`), and the
precision every network computes in (:mod:`.precision`: :class:`~.precision.Network`).

A network or loss of one method family lives with its detector in ``iadkit.methods.<family>``.
"""
