"""The run's entry layer: the command line (``args``), the one resolved run spec (``spec``), the checks made
before anything loads (``preflight``), the output folder and its lock (``rundir``, ``runlock``), and what a run
leaves behind (``results``, ``export``, ``plots``) or says when it fails (``faults``).

May import: ``training``, ``data``, ``cap``, ``compression``, ``sparse``, ``ops``, ``runtime``. Only the entry
points (``cap_ds/train.py``, ``cap_ds/launch.py``) import it.
"""
