"""Minimal servers that bound what the broker's design can reach on this machine.

What this package holds: the minimal trio responder the Hello-throughput target is
measured against (``responder``), and a bare trio broker and backend doing exactly
the wire work of the reconnect and pipelined-handoff routes (``mini_broker``,
``mini_backend``), each run as a process of its own by ``bench``.

What it does not hold: anything rpbroker runs in production. These servers skip
every check that does not cost wire work (service catalog, version policy, rate
limit, supervision, events, metrics): they are bounds, not alternatives.
"""
