"""Per-source record data: config.data.sources.

Each source is one record file set (JSONL / Parquet / saved `datasets` directory) with its
own column names, the run split it feeds and, for training, its sampling weight:

    config.data.sources = {
        'gsm':    dict(path='/data/gsm8k.jsonl', split='train', domain='math',
                       columns={'prompt': 'question', 'answer': 'final_answer'}, weight=3.0),
        'aops':   dict(path='/data/aops/*.parquet', split='train', domain='math', weight=1.0),
        'charts': dict(dataset='/data/charts_saved', split='train', domain='chart',
                       columns={'prompt': 'prompt', 'answer': 'answer', 'images': 'image'}),
        'aime':   dict(path='/data/aime24.jsonl', split='eval', domain='math'),
        'charts_eval': dict(dataset='/data/charts_eval_saved', split='eval', domain='chart'),
    }

Fields: `path` (files: a path, comma-separated paths or globs) or `dataset` (a directory
written by `Dataset.save_to_disk`; a DatasetDict's split directory), exactly one;
`split`: 'train' or 'eval'; `domain`: one of config.tasks.capabilities (a branch of the
run); `columns`: record field -> column name of THIS source ({} = the field names);
`weight` (train): the domain's train sources are mixed by weight (a source of weight 3
gives three times the prompts of one of weight 1). A domain's eval sources are read in
name order, one after the other, for the first config.eval.num_examples held-out items.

Sources are named so that a field can be overridden on the command line:
`--config.data.sources.gsm.weight=2`, `--config.data.sources.gsm.columns.prompt=problem`.
A whole mapping can be given as a Python literal: `--config.data.sources="{'gsm': {...}}"`.

Without sources, the older fields describe the same thing: config.data.train_files /
eval_files (domain -> files) with one config.data.columns for every file (each file a
source of weight 1). Setting both is an error.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

SPLITS = ("train", "eval")
SOURCE_FIELDS = ("path", "dataset", "split", "domain", "columns", "weight")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One record source (see the module docstring). paths: what RecordSource reads."""
  name: str
  paths: Any  # a path / comma-separated paths / globs, or a list of them
  split: str
  domain: str
  columns: Mapping[str, str]
  weight: float = 1.0


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def _fields(data) -> Mapping:
  """config.data as a mapping: a RunSpec's DataSpec, or the config's own data node."""
  return dataclasses.asdict(data) if dataclasses.is_dataclass(data) else _plain(data)


def _fail(field: str, message: str, value) -> None:
  raise ValueError(f"config.{field} {message}, got {value!r}")


def parse_source(name: str, raw, record_fields) -> SourceSpec:
  """config.data.sources[name] -> SourceSpec; ValueError naming the field when wrong."""
  field = f"data.sources.{name}"
  raw = _plain(raw)
  if not isinstance(raw, Mapping):
    _fail(field, "must be a dict with path or dataset, split, domain, columns, weight", raw)
  unknown = sorted(set(raw) - set(SOURCE_FIELDS))
  if unknown:
    _fail(field, f"has unknown fields {unknown}; a source has {SOURCE_FIELDS}", dict(raw))
  given = [k for k in ("path", "dataset") if raw.get(k)]
  if len(given) != 1:
    _fail(field, "needs exactly one of 'path' (record files) or 'dataset' (a saved datasets "
          "directory)", dict(raw))
  paths = raw[given[0]]
  if not (isinstance(paths, str) or (isinstance(paths, (list, tuple))
                                     and all(isinstance(p, str) and p for p in paths))):
    _fail(f"{field}.{given[0]}", "must be a path, comma-separated paths or a list of paths",
          paths)
  split = raw.get("split", "train")
  if split not in SPLITS:
    _fail(f"{field}.split", f"must be one of {SPLITS}", split)
  domain = raw.get("domain")
  if not isinstance(domain, str) or not domain:
    _fail(f"{field}.domain", "must name the run domain (a capability) it feeds", domain)
  columns = _plain(raw.get("columns", {})) or {}
  if not isinstance(columns, Mapping):
    _fail(f"{field}.columns", "must map record fields to column names", columns)
  for key, column in columns.items():
    if key not in record_fields:
      _fail(f"{field}.columns", f"maps {key!r}, which is not a record field {record_fields}",
            dict(columns))
    if not isinstance(column, str) or not column:
      _fail(f"{field}.columns.{key}", "must be a column name (a non-empty string)", column)
  weight = raw.get("weight", 1.0)
  if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
      or not math.isfinite(weight) or weight <= 0):
    _fail(f"{field}.weight", "must be a positive finite number", weight)
  return SourceSpec(name, paths, split, domain, dict(columns), float(weight))


def legacy_sources(data) -> list[SourceSpec]:
  """config.data.train_files / eval_files with the one config.data.columns, as sources
  named '<split>_<domain>' (weight 1)."""
  data = _fields(data)
  columns = dict(_plain(data.get("columns", {})) or {})
  out = []
  for split, field in (("train", "train_files"), ("eval", "eval_files")):
    for domain, paths in (_plain(data.get(field, {})) or {}).items():
      out.append(SourceSpec(f"{split}_{domain}", paths, split, domain, columns))
  return out


def has_sources(data) -> bool:
  data = _fields(data)
  return bool(_plain(data.get("sources", {})))


def all_sources(data, record_fields=None) -> list[SourceSpec]:
  """Every record source of config.data, in name order: config.data.sources, or else the
  older train_files / eval_files. ValueError naming the field when a source is wrong."""
  if record_fields is None:
    from copd_jax.data import records
    record_fields = records.RECORD_FIELDS
  data = _fields(data)
  sources = _plain(data.get("sources", {})) or {}
  if not sources:
    return legacy_sources(data)
  if not isinstance(sources, Mapping):
    _fail("data.sources", "must map a source name to its fields (see copd_jax/data/sources.py)",
          sources)
  if _plain(data.get("train_files", {})) or _plain(data.get("eval_files", {})):
    _fail("data.sources", "replaces config.data.train_files / eval_files: give sources only "
          "(move each file into a source)", sorted(sources))
  if _plain(data.get("columns", {})):
    _fail("data.columns", "is per source with config.data.sources: move it into each "
          "source's columns (config.data.sources.<name>.columns)", dict(_plain(data["columns"])))
  return [parse_source(name, sources[name], record_fields) for name in sorted(sources)]


def by_domain(sources, split: str) -> dict[str, list[SourceSpec]]:
  """{domain: its sources of `split`} in name order."""
  out: dict[str, list[SourceSpec]] = {}
  for source in sources:
    if source.split == split:
      out.setdefault(source.domain, []).append(source)
  return out
