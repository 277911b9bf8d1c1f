"""fedseal.sim: the top floor: whole federations on one machine.

It imports the coordinator (:mod:`fedseal.server`) and the site (:mod:`fedseal.client`) openly;
nothing below imports it. ``inmemory`` runs N protocol sessions and a coordinator exchanging
bytes in memory (tests, benchmarks), ``simulate`` runs the real ServerApp and ClientApp on
Flower's simulation engine (``engine``: the Ray backend and in-memory link state; ``sites``: how
the virtual sites are built; ``errors``: ``SimulationError``), ``flower_patches`` holds every
patch of Flower's engine internals the simulation applies, ``shared_work`` is the work one
process's virtual sites share (signature checks, decodes: the simulation's side of
:mod:`fedseal.protocol.seams`), ``demo`` starts real ``fl-server``/``fl-client`` processes on
loopback, and ``commands`` is ``fl-server`` (the coordinator's commands plus ``demo`` and
``simulate``).
"""

__all__: list[str] = []
