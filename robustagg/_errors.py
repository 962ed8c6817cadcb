"""robustagg's own exceptions (the argument checks that raise ValueError and TypeError are in _checks.py)."""


class NonFiniteUpdateError(ValueError):
    """Raised under ``nonfinite="raise"`` when client rows hold NaN or Inf (docs/nonfinite.md).

    ``clients`` lists the offending rows, as the caller's original row numbers.
    """

    def __init__(self, clients, op):
        self.clients = [int(c) for c in clients]
        self.op = op
        shown = ", ".join(str(c) for c in self.clients[:20])
        more = f" and {len(self.clients) - 20} more" if len(self.clients) > 20 else ""
        super().__init__(
            f"{op}: {len(self.clients)} client row(s) hold NaN or Inf: [{shown}{more}]; "
            "pass nonfinite='drop' to exclude them or nonfinite='propagate' to skip the check"
        )


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""
