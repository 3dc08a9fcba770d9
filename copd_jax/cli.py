"""The command-line conventions every copd_jax entry point shares (absl flags).

* `--help` / `--helpfull`: the module's usage, then (with `--config=...`) every config field
  with its default and one-line meaning (the RunSpec dataclasses' field docs,
  run_spec.field_doc), then the flags; exit 0.
* A bad value prints one line `error: ...` naming the field and exits 1; `--traceback`
  shows the full traceback instead.
* `--config.rl.capabilities=text,image` is a tuple of capabilities; `num_experts`, the
  hub and the static-OPD pair follow it unless they are overridden too.
* Without `--config.workdir` a run is written to `runs/<run name>` (copd_jax/run_dir.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any, Callable

import ml_collections
from absl import app, flags

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of an error "
                               "instead of one line.")
HELP_FLAGS = ("-h", "-?", "--help", "--helpfull", "--helpshort", "--help=true", "--helpfull=true")
# Errors a user fixes by changing a value or a path: printed as one line.
USER_ERRORS = (ValueError, OSError, ArithmeticError, KeyError, TypeError)
CAPABILITY_TUPLES = ("tasks.capabilities", "rl.capabilities")


# --------------------------------------------------------------------------- fields


def get_field(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def set_field(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  node[leaf] = value


def has_field(cfg: ml_collections.ConfigDict, dotted: str) -> bool:
  try:
    get_field(cfg, dotted)
    return True
  except (KeyError, AttributeError):
    return False


def split_commas(values) -> tuple[str, ...]:
  """('text,image',) or 'text,image' -> ('text', 'image'): ml_collections parses a bare
  comma list given for a tuple field as one string."""
  if isinstance(values, str):
    values = (values,)
  return tuple(p.strip() for v in values for p in str(v).split(",") if p.strip())


def derive_from_capabilities(cfg: ml_collections.ConfigDict, overridden) -> None:
  """Fields that follow rl.capabilities when it was given on the command line and they
  were not: num_experts (one branch per capability; 1 for base / mixed RLVR), the hub
  (kept if still a capability, else the first) and the static-OPD teacher / student."""
  overridden = set(overridden)
  for field in CAPABILITY_TUPLES:
    if field in overridden and has_field(cfg, field):
      set_field(cfg, field, split_commas(get_field(cfg, field)))
  if "rl" not in cfg or "rl.capabilities" not in overridden:
    return
  caps = tuple(cfg.rl.capabilities)
  if not caps:
    return
  if "num_experts" not in overridden:
    cfg.num_experts = 1 if cfg.method in ("base", "mixed_rlvr") else len(caps)
  if "rl.opd.hub" not in overridden and cfg.rl.opd.hub not in caps:
    cfg.rl.opd.hub = caps[0]
  pair = cfg.rl.static_opd
  if "rl.static_opd.teacher" not in overridden and pair.teacher not in caps:
    pair.teacher = caps[0]
  if "rl.static_opd.student" not in overridden and (pair.student not in caps
                                                    or pair.student == pair.teacher):
    pair.student = next((c for c in caps if c != pair.teacher), caps[0])


# ------------------------------------------------------- fields a checkpoint fixes

# What config.model still sets when config.init.hf_checkpoint is the model: how to
# compute (dtype, remat, attention), never the architecture.
CHECKPOINT_READ_MODEL_FIELDS = ("dtype", "remat", "attention_block", "attention_kernel", "lora")
# With a checkpoint, the checkpoint is the base: no SFT warm-start, and the procedural
# suite's difficulty knob is unused (the data are record files).
UNUSED_WITH_CHECKPOINT = ("warm_start", "tasks.difficulty")


def checkpoint_fixes(field: str) -> bool:
  """True for a config.model field that a Hugging Face checkpoint's config.json decides."""
  parts = field.split(".")
  return parts[0] == "model" and len(parts) > 1 and parts[1] not in CHECKPOINT_READ_MODEL_FIELDS


def starts_from_checkpoint(cfg: ml_collections.ConfigDict) -> bool:
  """Whether cfg's base is a Hugging Face checkpoint: one is given, or required (a real
  config's unset placeholder, None)."""
  return "init" in cfg and cfg.init.get("hf_checkpoint", "") != ""


def applies(field: str, cfg: ml_collections.ConfigDict) -> bool:
  """Whether a dotted field does anything in this config: with a Hugging Face checkpoint,
  the model fields its config.json fixes (checkpoint_fixes), the SFT warm-start and the
  procedural tasks' difficulty do not."""
  if not starts_from_checkpoint(cfg):
    return True
  if checkpoint_fixes(field):
    return False
  return not any(field == p or field.startswith(p + ".") for p in UNUSED_WITH_CHECKPOINT)


def checkpoint_value(checkpoint_dir: str, field: str) -> Any:
  """The value the checkpoint gives config.model.<field> (None when it has none, e.g. a
  vision field of a text-only checkpoint, or an unreadable config.json)."""
  try:
    from copd_jax.models import hf_config
    hf = hf_config.read_hf_config(checkpoint_dir)
    if "text_config" in hf:  # Qwen3-VL: the language model's part
      from copd_jax.models.qwen3_vl_config import Qwen3VLConfig
      model = Qwen3VLConfig.from_hf(hf).text
    else:
      model = hf_config.model_config_from_hf(hf)
  except Exception:  # the checkpoint's own errors are reported by validation later
    return None
  node = model
  for part in field.split(".")[1:]:
    node = getattr(node, part, None)
  return node


def reject_checkpoint_fixed_overrides(cfg: ml_collections.ConfigDict, overridden) -> None:
  """An overridden config.model field that the checkpoint fixes would change nothing (the
  architecture comes from its config.json) yet name a new run: ValueError naming the
  field and the checkpoint's value."""
  checkpoint_dir = cfg.get("init", {}).get("hf_checkpoint", "") if "init" in cfg else ""
  if not checkpoint_dir:
    return
  for field in sorted(overridden):
    if checkpoint_fixes(field):
      value = checkpoint_value(checkpoint_dir, field)
      has = f"its config.json gives {value!r}" if value is not None else \
          "this checkpoint has no such setting"
      raise ValueError(
          f"config.{field} is fixed by the checkpoint config.init.hf_checkpoint="
          f"{checkpoint_dir!r} ({has}); remove --config.{field} (with a checkpoint, "
          f"config.model sets only {', '.join(CHECKPOINT_READ_MODEL_FIELDS)})")


# ---------------------------------------------------------------------- config files


def config_flag(help_text: str = "Run config (configs/*.py).") -> flags.FlagHolder:
  """The shared --config flag (an ml_collections config file, locked): defined by the first
  entry point imported, reused by the others (copd_jax.main and copd_jax.export, which a
  program may import together)."""
  from ml_collections import config_flags
  if "config" not in flags.FLAGS:
    return config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
  return flags.FlagHolder(flags.FLAGS, flags.FLAGS["config"])



def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config a `--config=path.py[:arg]` names, without command-line overrides."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_copd_config_preset", path)
  if module_spec is None:
    raise FileNotFoundError(f"--config={spec}: {path} is not a Python config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _json_value(value: Any) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.dumps(value, sort_keys=True, default=str)


def changed_overrides(cfg, preset, overridden) -> dict[str, Any]:
  """{field: value} of the overridden fields whose final value differs from the preset."""
  out = {}
  for field in sorted(overridden):
    if not has_field(cfg, field):
      continue
    value = get_field(cfg, field)
    if not has_field(preset, field) or _json_value(value) != _json_value(get_field(preset, field)):
      out[field] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return out


def resolve(cfg: ml_collections.ConfigDict, spec: str, overridden) -> ml_collections.ConfigDict:
  """The run config of a command line: capability lists split and the fields that follow
  them derived; without an overridden workdir, workdir = <preset's parent>/<run name>."""
  from copd_jax import run_dir
  derive_from_capabilities(cfg, overridden)
  reject_checkpoint_fixed_overrides(cfg, overridden)
  if "workdir" not in overridden:
    preset = load_config_file(spec)
    derive_from_capabilities(preset, ())
    preset_dir = str(preset.workdir).rstrip("/")
    parent = os.path.dirname(preset_dir) or "runs"
    cfg.workdir = os.path.join(parent, run_dir.run_name(
        as_json(cfg), changed_overrides(cfg, preset, overridden),
        prefix=os.path.basename(preset_dir) or cfg.method))
  return cfg


def as_json(cfg: ml_collections.ConfigDict) -> dict:
  """The config's fields as plain JSON values (tuples become lists), as config.json has them."""
  return json.loads(cfg.to_json_best_effort())


def config_from_flag(flag_name: str = "config") -> ml_collections.ConfigDict:
  """The parsed --config of the running program, resolved (see `resolve`)."""
  from ml_collections import config_flags
  holder = flags.FLAGS[flag_name]
  overridden = set(config_flags.get_override_values(holder))
  return resolve(holder.value, config_flags.get_config_filename(holder), overridden)


# ----------------------------------------------------------------------------- help


def _wants_help(argv) -> bool:
  return any(a in HELP_FLAGS for a in argv[1:])


class _Required:
  """The value --help shows for a path a real config requires and nobody set yet."""

  def __repr__(self) -> str:
    return "<required>"


REQUIRED = _Required()


def describe_fields(flat) -> list[str]:
  """'  field = default    meaning' lines for a flattened config (run_dir.flatten); the
  meanings are the RunSpec dataclasses' field docs (run_spec.field_doc)."""
  from copd_jax import run_spec
  width = min(max((len(f"{k} = {v!r}") for k, v in flat.items()), default=0), 44)
  return [f"  {f'{k} = {v!r}':<{width}}  {run_spec.field_doc(k)}".rstrip()
          for k, v in flat.items()]


def help_text(argv, doc: str, modules) -> str:
  """Usage, the config's fields (when --config is given) and the flags of `modules`."""
  from copd_jax import run_dir
  rest = [a for a in argv if a not in HELP_FLAGS]
  lines = [doc.strip(), ""]
  try:
    flags.FLAGS(rest)
    parsed = True
  except flags.Error as e:
    lines += [f"(could not read the command line: {e})", ""]
    parsed = False
  if parsed and "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
    cfg = config_from_flag()
    from ml_collections import config_flags
    spec = config_flags.get_config_filename(flags.FLAGS["config"])
    lines += [f"Config fields of --config={spec} (override with --config.<field>=value):"]
    flat = run_dir.flatten(as_json(cfg))
    from copd_jax import config_lib
    for field in config_lib.unset_required_paths(cfg):  # a real config's unset paths
      flat[field] = REQUIRED
    shown = {k: v for k, v in flat.items() if applies(k, cfg)}
    lines += describe_fields(shown)
    if len(shown) < len(flat):
      lines += [f"  ({len(flat) - len(shown)} fields that do nothing with config.init."
                "hf_checkpoint are not listed: the checkpoint fixes the model's architecture, "
                "and it is the base, so there is no warm-start)"]
    lines += [""]
  elif "config" in flags.FLAGS:
    lines += ["Add --config=configs/<method>.py to list that config's fields.", ""]
  full = "--helpfull" in argv or "--helpfull=true" in argv
  lines += ["Flags:", flags.FLAGS.get_help() if full else
            "\n".join(flags.FLAGS.module_help(m) for m in modules)]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- running


def one_line(error: BaseException) -> str:
  """`error: <message>` (the message's own line breaks kept, type name for bare errors)."""
  message = str(error).strip() or type(error).__name__
  if isinstance(error, KeyError) and error.args:
    message = f"KeyError: {error.args[0]}"
  return f"error: {message}"


def quiet_libraries() -> None:
  """Library INFO lines (orbax logs every checkpoint save and restore) stay off the
  console unless --verbosity is given."""
  from absl import logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import logging as py_logging
  for name in ("orbax",):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def guarded(main: Callable) -> Callable:
  """main(argv) that prints user errors as `error: ...` and exits 1 (--traceback: raise)."""
  def wrapper(argv):
    quiet_libraries()
    try:
      return main(argv)
    except (app.UsageError, *USER_ERRORS) as e:
      if _TRACEBACK.value:
        raise
      print(one_line(e) + "  (--traceback for details)", file=sys.stderr, flush=True)
      sys.exit(1)
  return wrapper


def _innermost_message(error: BaseException) -> str:
  """ml_collections wraps a KeyError's message in an AttributeError: unwrap to the text.
  A config file that raised (e.g. an unknown preset, `:mikro`) arrives as the flag name
  plus the file's whole traceback: that becomes `flag --config=...: <the error's line>`."""
  message = error
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]
  text = str(message)
  if "Traceback (most recent call last)" in text:
    flag = text.split(": Error whilst parsing config file", 1)[0].split("\n", 1)[0]
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    kind, sep, rest = last.partition(": ")
    if sep and kind.replace(".", "").isidentifier() and kind.endswith(("Error", "Exception")):
      last = rest if kind.endswith("ValueError") else f"{kind.rsplit('.', 1)[-1]}: {rest}"
    return f"{flag.strip()}: {last}"
  return text.replace("\n", "; ").strip()


def parse_flags(argv) -> list[str]:
  """flags.FLAGS(argv), with a bad flag or config override as one `error:` line, exit 1
  (absl's own parser prints a traceback for an unknown config field)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # flags.Error, and AttributeError/KeyError for unknown fields
    if "--traceback" in argv:
      raise
    message = _innermost_message(e)
    if isinstance(e, (AttributeError, KeyError)):
      name = message.split(";")[0].strip("'\" ")
      where = next((a for a in argv[1:] if f".{name}" in a.split("=")[0]), None)
      message = f"unknown config field {name!r}" + (f" in {where}" if where else "") + \
          (f" ({message.split(';', 1)[1].strip()})" if ";" in message else "")
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(main: Callable, doc: str, modules=("__main__",), argv=None) -> None:
  """app.run(main) with the shared help and error conventions."""
  argv = list(sys.argv if argv is None else argv)
  if _wants_help(argv):
    names = [sys.modules[m].__name__ if m in sys.modules else m for m in modules]
    print(help_text(argv, doc, [*names, __name__]))
    sys.exit(0)
  app.run(guarded(main), argv=argv, flags_parser=parse_flags)
