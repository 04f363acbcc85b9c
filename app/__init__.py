"""The growth service's HTTP API (FastAPI), job store and object storage.

``create_app`` lives in :mod:`app.main`; this package stays import-light so that the Celery
worker's parent process can use the lifecycle and storage modules without loading torch.
"""
