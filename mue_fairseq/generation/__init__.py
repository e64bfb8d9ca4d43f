from .exit_generator import ExitAwareSequenceGenerator  # noqa: F401
