"""Planners: the searches that passes call, not passes themselves.

A pass (``passes/*.py``) takes the graph or program and returns it changed;
a planner answers a question about it and changes nothing. ``remat`` and
``remat_search`` (over ``plans``) choose which forward values the backward gets saved and
which it recomputes (for ``passes/checkpoint.py``), and ``ledger`` describes
that choice for the report; ``grouping`` chooses
which nodes share a kernel (for ``passes/fusion.py``); ``windows`` chooses
which stretch of the schedule each arena covers (for
``passes/buffer_reuse.py``). The pipeline never runs them on their own.
"""
