"""Running trained detectors in production: the HTTP service (:mod:`iadkit.deploy.service`).

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install iadkit[serve]``.
"""
