"""The common base of dpfl's exceptions (no imports: every layer, torch-free ones too, uses it)."""

__all__ = ["DPFLError"]


class DPFLError(Exception):
    """Base class of every exception that dpfl raises on purpose.

    Each dpfl error also subclasses the built-in exception that describes it
    (``ValueError`` for bad input or data, ``RuntimeError`` for a run that cannot go on), so both
    ``except dpfl.DPFLError`` and ``except ValueError`` catch it. Bad arguments to a constructor
    or function raise plain ``ValueError``/``TypeError`` naming the argument.

    Examples:
        >>> import dpfl
        >>> issubclass(dpfl.BudgetExceededError, dpfl.DPFLError)
        True
        >>> issubclass(dpfl.BudgetExceededError, RuntimeError)
        True
    """
