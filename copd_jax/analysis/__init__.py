"""Audits of a compiled step that tests and benchmarks use: collectives crossing the expert
axis and allocation-free lowering of the sharded update."""
