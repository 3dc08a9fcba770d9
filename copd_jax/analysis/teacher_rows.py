"""Rows a traced program's teacher forwards really compute, read from its jaxpr.

score_by_teachers runs every teacher micro-batch through a jit named `teacher_forward`
(scoring._teacher_forward). In the program's jaxpr that is a call whose output shapes are
what was computed: vmapped over teachers they carry the teachers' axis, inside a
jax.lax.map (micro-batches, or branches one after another) they run once per trip.
Counting those shapes measures the padding a layout really leaves, independently of the
routing tables that say which rows are useful.
"""
from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core

TEACHER_FORWARD = "teacher_forward"


def _sub_jaxprs(value):
  """The jaxprs held in an equation parameter (a jaxpr, a closed one, or a tuple of them)."""
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _rows_of_call(eqn) -> int:
  """Rows one teacher_forward call scores: its first output is log-probs [..., N, W]
  (sampled-token) or, with a second output of ids, [..., N, W, k] (top-k)."""
  shape = eqn.outvars[0].aval.shape
  trailing = 2 if len(eqn.outvars) > 1 else 1
  return math.prod(shape[:-trailing])


def _count(jaxpr, trips: int, calls: list) -> int:
  rows = 0
  for eqn in jaxpr.eqns:
    if eqn.params.get("name") == TEACHER_FORWARD:
      calls.append((trips, tuple(eqn.outvars[0].aval.shape)))
      rows += trips * _rows_of_call(eqn)
      continue
    inner_trips = trips * int(eqn.params["length"]) if eqn.primitive.name == "scan" else trips
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        rows += _count(sub, inner_trips, calls)
  return rows


def teacher_forward_rows(closed_jaxpr) -> tuple[int, list]:
  """(rows, calls): the rows every teacher_forward call in closed_jaxpr (jax.make_jaxpr's
  result) computes, scan trips included, and each call as (trips, first output shape)."""
  calls: list = []
  rows = _count(closed_jaxpr.jaxpr, 1, calls)
  return rows, calls


def traced_teacher_rows(fn, *args) -> tuple[int, list]:
  """teacher_forward_rows of fn(*args) traced (nothing runs; args may be
  jax.ShapeDtypeStruct)."""
  return teacher_forward_rows(jax.make_jaxpr(fn)(*args))
