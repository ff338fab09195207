"""iadkit: unsupervised industrial visual anomaly detection.

Train a detector on images of good parts only, then score new images and localise defects
with a pixel anomaly map::

    from iadkit import create_detector
    from iadkit.data import load_dataset

    train, test = load_dataset("data/magnetic_tile")
    detector = create_detector("patchcore", preset="cpu").fit(train)
    prediction = detector.predict(images)   # prediction.anomaly_maps, prediction.scores
"""

__version__ = "0.1.0"
