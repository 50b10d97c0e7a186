"""What both stages use: cache schema and store, configs, manifests, seeding, logging.

This package imports neither ``lare2.extract`` nor ``lare2.train``.
"""
