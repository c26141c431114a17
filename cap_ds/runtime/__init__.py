"""The process runtime every layer stands on: ranks and collectives (``collectives``), host -> device copies
(``transfer``), stop signals (``signals``), the error types and their exit codes (``errors``, ``iofaults``),
atomic and checksummed files (``atomic``, ``manifest``), random state (``rng``), and log lines, scalars and step
timing (``monitor``, ``steptimer``).

May import: nothing else from cap_ds. Everything else may import it.
"""
