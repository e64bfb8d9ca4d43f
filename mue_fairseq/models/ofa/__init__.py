from .model import OFAModel  # noqa: F401  (registers model `ofa` and its architectures)
