from . import ofa  # noqa: F401
