"""The README's results paragraph, written from the study's reports so that none of its
numbers can disagree with them.

reproduce.py rewrites the text between BEGIN and END in README.md from results.json and
the reports beside it (ablation.json's estimator ablation, diagnostic_phases.json);
judgements in words stay outside the markers. tests/experiments/test_readme_results.py
checks the committed README against the committed reports.

A difference "a − b" is printed as mean [low, high] in points, one decimal, with its
sign: the 95% interval the reports hold (experiments/stats.py).
"""
from __future__ import annotations

import json
import os
import textwrap

BEGIN = "<!-- results: written by experiments/reproduce.py from experiments/results; do not edit -->"
END = "<!-- end of the written results -->"
STRONG = "Merged experts (strong: TA or TIES)"


def signed(d) -> str:
  """{'mean', 'ci95'} or [mean, low, high] -> '+4.3 [-0.7, 9.4]'."""
  mean, low, high = (d["mean"], *d["ci95"]) if isinstance(d, dict) else d
  return f"{mean:+.1f} [{low:.1f}, {high:.1f}]"


def negated(d: dict) -> dict:
  """b − a from a − b: the mean and the interval flip."""
  return {"mean": -d["mean"], "ci95": [-d["ci95"][1], -d["ci95"][0]]}


def signed_small(d: dict) -> str:
  """A per-step change: four decimals."""
  return f"{d['mean']:+.4f} [{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}]"


def plain(d: dict) -> str:
  return f"{d['mean']:.1f} [{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}]"


def main_study(result: dict) -> str:
  """The toy suite's comparison: accuracies, CoPD's leads, coverage and the claims."""
  acc, minus_copd = result["accuracy_points"], result["minus_copd_points"]
  copd_minus = {name: signed(negated(minus_copd[name]["overall"]))
                for name in ("Mixed RLVR", "Merged experts", STRONG) if name in minus_copd}
  claims = result["claims"]
  return (
      f"On the toy suite ({len(result['seeds'])} seeds, "
      f"{result['eval_examples_per_capability']:,} items per capability) merged CoPD scores "
      f"{plain(acc['CoPD (merged)']['overall'])}; mixed RLVR "
      f"{acc['Mixed RLVR']['overall']['mean']:.1f}, MOPD {acc['MOPD']['overall']['mean']:.1f}, "
      f"merged experts {result['merged_experts']['overall']['mean']:.1f} (uniform) and "
      f"{result['merged_experts_strong']['overall']['mean']:.1f} (strong merge). Seed-level 95% "
      f"intervals (simulated coverage >= {result['interval_coverage_simulated']:.3f}; Holm "
      f"inside each claim): CoPD − mixed RLVR {copd_minus['Mixed RLVR']}, − merged experts "
      f"{copd_minus['Merged experts']}, − strong merge {copd_minus.get(STRONG, '—')}. Claims: "
      f"(a) mixed RLVR loses somewhere {claims['mixed_loses_somewhere']}, (b) MOPD absorbs "
      f"less {claims['mopd_absorbs_less']}, (c) CoPD beats all {claims['copd_beats_all']}, "
      f"CoPD beats merged experts {claims['copd_beats_merged_experts']}.")


def dial(levels: list[dict]) -> str:
  """The divergence dial: the merge's loss per level (beside the experts' symmetric KL on
  the fixed probe), and CoPD at the far end."""
  if not levels:
    return ""
  far = levels[-1]
  seeds = sorted({len(e["seeds"]) for e in levels})
  gaps = ", ".join(f"{signed(e['merged_experts_own_gap_points'])} at conflict {e['level']:g} "
                   f"(KL {e['expert_divergence_sym_kl']:.2f})" for e in levels)
  per_seed = far.get("copd_minus_merged_experts_per_seed") or {}
  spread = (f" (per seed {min(per_seed.values()):+.1f} to {max(per_seed.values()):+.1f})"
            if per_seed else "")
  acc = far["accuracy_points"]
  other = ""
  if "CoPD branches (other family)" in acc and "Experts (other family)" in acc:
    other = (f"; a CoPD branch scores {acc['CoPD branches (other family)']['overall']['mean']:.1f} "
             f"on the other family's items (an expert "
             f"{acc['Experts (other family)']['overall']['mean']:.1f})")
  heavy = ""
  if far.get("copd_opd_heavy_minus_copd") is not None:
    branches = acc.get("CoPD 1:2 branches (other family)")
    heavy = (f" CoPD with twice as many OPD as RL steps (1:2): − merged experts "
             f"{signed(far['copd_opd_heavy_minus_merged_experts'])}, − CoPD "
             f"{signed(far['copd_opd_heavy_minus_copd'])}"
             + (f"; its branch scores {branches['overall']['mean']:.1f} on the other family"
                if branches else "") + ".")
  return (
      f"Dial (two capabilities that conflict on look-alike prompts; "
      f"{' or '.join(map(str, seeds))} seeds per level), experts − merged experts on their own "
      f"capabilities: {gaps}. At conflict {far['level']:g}: CoPD − merged experts "
      f"{signed(far['copd_minus_merged_experts'])}{spread}, − MOPD "
      f"{signed(far['copd_minus_mopd'])}, − mixed RLVR {signed(far['copd_minus_mixed_rlvr'])}; "
      f"MOPD − experts {signed(far['mopd_minus_experts'])}{other}.{heavy}")


def estimator(ablation: dict | None) -> str:
  est = (ablation or {}).get("estimator")
  if not est:
    return ""
  diff = est["top_k_minus_sampled_token_points"]
  p_holm = min(v["p_holm"] for k, v in diff.items() if k != "overall")
  return (f"Top-k OPD (k = 16) − the sampled-token estimator: {signed(diff['overall'])} "
          f"overall ({len(ablation['seeds'])} seeds; Holm p >= {p_holm:.2f} per capability).")


def diagnostics(report: dict | None) -> str:
  if not report or report.get("unfinished_runs"):
    return ""
  change = report["mean_change_per_step"]
  labels = {"top-10 overlap between branches": "overlap", "symmetric KL between branches":
            "symmetric KL", "flawed-procedure answer rate": "flawed-answer rate"}
  parts = [f"{label} {signed_small(change[name]['opd_minus_rl'])}" for name, label in labels.items()]
  return (f"Fixed diagnostic prompts (CoPD seed{'s' if len(report['seeds']) > 1 else ''} "
          f"{', '.join(map(str, report['seeds']))}, every step), change per OPD step − per RL "
          f"step between branches: {', '.join(parts)}.")


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def paragraph(result: dict, out_dir: str) -> str:
  """The written results, from results.json (`result`) and the reports in `out_dir`."""
  pieces = [main_study(result), dial(result.get("dial") or []),
            estimator(_read_json(os.path.join(out_dir, "ablation.json"))),
            diagnostics(_read_json(os.path.join(out_dir, "diagnostic_phases.json")))]
  return " ".join(p for p in pieces if p)


def replace_block(readme: str, block: str) -> str:
  """readme with the text between BEGIN and END (each on its own line) replaced by block."""
  start, end = readme.find(BEGIN + "\n"), readme.find("\n" + END)
  if start < 0 or end < 0 or end < start:
    raise ValueError(f"the README has no results block: it needs a line {BEGIN!r} and, "
                     f"after it, a line {END!r}")
  return readme[:start + len(BEGIN) + 1] + block + readme[end:]


def rewritten(readme: str, result: dict, out_dir: str) -> str:
  """readme with its results block written from `result` and the reports in `out_dir`."""
  block = textwrap.fill(paragraph(result, out_dir), width=92, break_long_words=False,
                        break_on_hyphens=False)
  return replace_block(readme, block)


def update(readme_path: str, result: dict, out_dir: str) -> None:
  with open(readme_path) as f:
    text = f.read()
  new = rewritten(text, result, out_dir)
  if new != text:
    with open(readme_path, "w") as f:
      f.write(new)
