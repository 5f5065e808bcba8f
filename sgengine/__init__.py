"""sgengine: SuperGlobal image retrieval as a low-latency engine."""
__version__ = "0.1.0"
