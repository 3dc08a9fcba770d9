"""RESULTS.md: every results table and verdict of the toy-suite study, written from
results.json (and the ablation and overlap-phase reports beside it) by
experiments/reproduce.py, so no number in it can disagree with the JSON. Numbers are
printed as stored (points to 2 decimals, p-values to 4), never re-rounded.

    results_doc.write(path, result, out_dir, caps, two_caps)
"""
from __future__ import annotations

import json
import os

HEADER = ("<!-- Written by experiments/reproduce.py (python experiments/reproduce.py "
          "--report_only); do not edit by hand. -->\n")


def cell(d) -> str:
  """'mean [low, high]' as stored; '—' when absent."""
  if d is None:
    return "—"
  if isinstance(d, (list, tuple)):
    return f"{d[0]} [{d[1]}, {d[2]}]"
  return f"{d['mean']} [{d['ci95'][0]}, {d['ci95'][1]}]"


def table(rows: dict, columns, title: str, study_seeds=None) -> list[str]:
  """A markdown table of {row name: {column: {'mean', 'ci95'}}}; a 'seeds' column when
  some row has finished on fewer seeds than the study's."""
  partial = study_seeds is not None and any(
      r.get("seeds") not in (None, study_seeds) for r in rows.values())
  head = [title, *columns] + (["seeds"] if partial else [])
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for name, row in rows.items():
    cells = [cell(row.get(c)) for c in columns]
    if partial:
      cells.append(str(row.get("seeds", study_seeds)))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def test_rows(tests: dict) -> list[str]:
  lines = ["| comparison | difference (points) | p | p (Holm) |", "|---|---|---|---|"]
  for key, d in tests.items():
    lines.append(f"| {key} | {cell(d)} | {d.get('p', '—')} | {d.get('p_holm', '—')} |")
  return lines


def claims_section(result: dict, caps) -> list[str]:
  detail = result["claims_detail"]
  lines = ["## Claims\n",
           "Rules (`experiments/reproduce.py`, `claims`; the margin is 2 points):",
           "- (a) `mixed_loses_somewhere`: supported if mixed RLVR is significantly below an "
           "expert on the expert's capability (Holm across the 3 capabilities); refuted if "
           "every capability's interval excludes a loss of more than 2 points; else "
           "inconclusive.",
           "- (b) `mopd_absorbs_less`: the same test for the MOPD student.",
           "- (c) `copd_beats_all`: supported if merged CoPD's interval excludes a loss of "
           "more than 2 points to each expert on its capability AND CoPD is significantly "
           "above mixed RLVR and MOPD overall; refuted if any of these 5 comparisons is "
           "significantly in the other direction (Holm across the 5); else inconclusive.",
           "- (d) `copd_beats_merged_experts`: supported if merged CoPD is significantly "
           "above every merge of the independent experts (uniform; strong) "
           "overall; refuted if a merge is significantly above CoPD (Holm across the "
           "merges); else inconclusive.",
           "", "| claim | verdict |", "|---|---|"]
  lines += [f"| {k} | **{v}** |" for k, v in result["claims"].items()]
  names = {"mixed_loses_somewhere": "Mixed RLVR − expert, on the expert's capability",
           "mopd_absorbs_less": "MOPD − expert, on the expert's capability"}
  for key, title in names.items():
    d = detail.get(key, {})
    if "minus_expert_points" in d:
      lines += ["", f"### ({key}) {title}: {d['verdict']}\n"]
      lines += test_rows(d["minus_expert_points"])
  d = detail.get("copd_beats_all", {})
  if "minus_expert_own_points" in d:
    tests = {f"CoPD − {c} expert ({c})": v for c, v in d["minus_expert_own_points"].items()}
    tests["CoPD − mixed RLVR (overall)"] = d["minus_mixed_overall_points"]
    tests["CoPD − MOPD (overall)"] = d["minus_mopd_overall_points"]
    lines += ["", f"### (copd_beats_all) merged CoPD against each: {d['verdict']}\n"]
    lines += test_rows(tests)
  d = detail.get("copd_beats_merged_experts", {})
  if "minus_merged_overall_points" in d:
    lines += ["", f"### (copd_beats_merged_experts) merged CoPD − merged experts: "
              f"{d['verdict']}\n"]
    lines += test_rows({f"CoPD − {m} (overall)": v
                        for m, v in d["minus_merged_overall_points"].items()})
    per_cap = d["minus_merged_per_capability_points"]
    lines += ["", "Per capability (not part of the verdict):\n"]
    lines += table(per_cap, caps, "CoPD − merge")
  return lines


def merged_section(result: dict, caps) -> list[str]:
  lines = ["## Merged experts\n",
           "The independent experts (method `experts`, the same runs as the expert rows) "
           "merged two ways:",
           "- **uniform**: the weight average CoPD also uses. The experts run scores it on "
           "the held-out items; it is the ablation's \"no OPD\" variant item for item.",
           "- **strong**: per seed, the best on 200 validation items per capability (never "
           "the eval items) of 8 candidates: task arithmetic, base + scale × Σ (expert − "
           "base), scale 1/3 (the uniform average), 1/2, 2/3, 5/6, 1; and TIES (top 20% "
           "of each task vector per tensor, elected sign, disjoint mean) at scale 0.5, 1, "
           "1.5 (`experiments/merge_experts.py`). It needs "
           "the experts' weights, which are not committed: where they were gone, the "
           "experts were retrained from the same seed and config (`experts_weights`). "
           "On another CPU the floating point drifts, so the retrained experts are not the "
           "committed ones bit for bit (agreement of their held-out rewards below); the "
           "row \"Merged experts, retrained (uniform)\" is the uniform merge of the same "
           "retrained experts, the like-for-like reference.", ""]
  rows = {}
  for key, name in (("merged_experts", "uniform"), ("merged_experts_strong", "strong (TA or TIES)"),
                    ("merged_experts_retrained_uniform", "uniform, retrained experts")):
    row = result.get(key)
    if row and "experts_minus_merged_own_points" in row:
      rows[name] = row["experts_minus_merged_own_points"]
  if rows:
    lines += ["Expert − merge on the expert's own capability (points; the strong and the "
              "retrained uniform merge against the retrained experts they merged). A merge "
              "finished on one seed has an interval over items only.\n"]
    lines += table(rows, caps, "merge")
  gain = result.get("merged_experts_strong_minus_retrained_uniform")
  if gain:
    lines += ["", "Strong merge − the uniform merge of the same (retrained) experts:\n"]
    lines += table({"strong − uniform": gain}, [*caps, "overall"], "merge")
  by_seed = result.get("merged_experts_strong_by_seed") or {}
  if by_seed:
    lines += ["", "| seed | chosen | validation accuracy of each candidate | experts retrained "
              "for weights: held-out rewards equal to the committed run's |", "|---|---|---|---|"]
    for seed, s in by_seed.items():
      agree = s.get("held_out_rewards_equal_to_reference")
      agree_text = "—" if not agree else ", ".join(f"{k} {v:.3f}" for k, v in agree.items()
                                                   if k.startswith("merged/") or k.split("/")[1] == k.split("/")[2])
      val = ", ".join(f"{k}: {v:.3f}" for k, v in (s.get("validation_accuracy") or {}).items())
      lines.append(f"| {seed} | {s.get('chosen')} | {val} | {agree_text} |")
  return lines


def coverage_section(result: dict) -> list[str]:
  cov = result.get("interval_coverage_simulated_detail") or {}
  lines = ["## How far the intervals hold\n",
           f"Interval method: {result['interval_method']}. For each comparison behind a "
           "claim, data sets are simulated from that comparison's own estimated variance "
           "components (seed, item, residual; Gaussian) at its numbers of seeds and items, "
           f"{cov.get('replicates')} times, and the share of nominal 95% intervals that "
           "cover the true difference is counted. The percentile bootstrap over seeds and "
           "items that the project used before is simulated the same way on two "
           "comparisons.\n",
           f"**Lowest simulated coverage: {result.get('interval_coverage_simulated')}** "
           "(target ≥ 0.93).\n",
           "| comparison | seeds × items | variance components (seed, item, residual) | "
           "coverage (t) | coverage (percentile bootstrap) |", "|---|---|---|---|---|"]
  for r in cov.get("comparisons", []):
    c = r["components"]
    lines.append(f"| {r['comparison']} | {r['seeds']} × {r['items']} | {c['seed']}, "
                 f"{c['item']}, {c['residual']} | {r['coverage']} | "
                 f"{r.get('coverage_percentile_bootstrap', '—')} |")
  return lines


def dial_section(result: dict) -> list[str]:
  levels = result.get("dial") or []
  if not levels:
    return []
  lines = ["## The divergence dial\n",
           "`experiments/dial.py` (two families, total and remain, that conflict on a share "
           "`conflict` of their prompts), read from its finished runs with the intervals "
           "above. A seed counts at a level once its runs there finished; each difference "
           "pairs the seeds both sides finished (its seeds in brackets). With one seed an "
           "interval holds the item noise only, with two the t quantile has 1 degree of "
           "freedom.\n",
           "| conflict | seeds | experts' symmetric KL | experts − merged experts (own) | "
           "CoPD − merged experts | MOPD − experts (own) | CoPD − MOPD | CoPD − mixed RLVR |",
           "|---|---|---|---|---|---|---|---|"]
  for e in levels:
    kl = e["expert_divergence_sym_kl"]
    gap = e["merged_experts_own_gap_points"]
    lines.append(
        f"| {e['level']:g} | {e['seeds']} | {'—' if kl is None else round(kl, 3)} | "
        f"{cell(gap)} | {cell(e['copd_minus_merged_experts'])} "
        f"{e.get('copd_minus_merged_experts_seeds') or ''} | "
        f"{cell(e['mopd_minus_experts'])} {e.get('mopd_minus_experts_seeds') or ''} | "
        f"{cell(e.get('copd_minus_mopd'))} | {cell(e.get('copd_minus_mixed_rlvr'))} |")
  for e in levels:
    if e["accuracy_points"]:
      lines += ["", f"Accuracy at conflict {e['level']:g} (points):\n"]
      rows = {k: dict(v) for k, v in e["accuracy_points"].items()}
      lines += table(rows, ["total", "remain", "overall"], "model", study_seeds=[])
  lines += ["", "![dial](" + "{results}/dial.png)"]
  return lines


def ablation_section(out_dir: str) -> list[str]:
  path = os.path.join(out_dir, "ablation.md")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  body = [("#" + line if line.startswith("#") else line) for line in text.splitlines()]
  return ["## Ablation sweep\n", "(`experiments/ablate.py`, from `ablation.json`.)\n"] + body[1:]


def interim_estimator_lines(data: dict) -> list[str]:
  """The estimator ablation while its runs train (ablation.json 'estimator_interim')."""
  interim = (data.get("estimator_interim") or {}).get("by_step")
  if not interim:
    return []
  caps = [c for c in next(iter(interim.values())) if c not in ("seeds", "per_seed")]
  lines = ["## The OPD estimator: sampled token against top-k reverse KL (NOT FINISHED)\n",
           "(`experiments/ablate.py --only estimator`, from `ablation.json`.) The top-k "
           "(k = 16) CoPD runs have not finished: merged top-k − sampled-token accuracy in "
           "points at the in-training evaluations so far (100 held-out items per capability, "
           "the same items and step in both runs), mean over the seeds listed; no interval. "
           "The final comparison (1,000 items, intervals, Holm) replaces this table.\n",
           "| step | seeds | " + " | ".join(caps) + " |", "|---" * (2 + len(caps)) + "|"]
  for step, e in interim.items():
    lines.append(f"| {step} | {e['seeds']} | " + " | ".join(str(e[c]) for c in caps) + " |")
  return lines


def estimator_section(out_dir: str) -> list[str]:
  """The OPD estimator ablation (ablation.json 'estimator', written by ablate.py): the final
  comparison, or while seeds still train, the interim table and the seeds finished so far."""
  path = os.path.join(out_dir, "ablation.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    data = json.load(f)
  if data.get("estimator"):
    return _estimator_header(data) + _estimator_comparison(data["estimator"])
  lines = interim_estimator_lines(data)
  finished = data.get("estimator_finished_seeds")
  if not finished:
    return lines
  lines = lines or ["## The OPD estimator: sampled token against top-k reverse KL (NOT FINISHED)\n"]
  return lines + ["", f"Final evaluation of the seeds finished so far ({finished['seeds']}; with "
                  "one seed the interval holds the item noise only):\n"] + _estimator_comparison(finished)


def _estimator_header(data: dict) -> list[str]:
  return ["## The OPD estimator: sampled token against top-k reverse KL\n",
          "(`experiments/ablate.py --only estimator`, from `ablation.json`; seeds "
          f"{data['seeds']}, {data['eval_examples_per_capability']} held-out items per "
          "capability.) Merged CoPD, the reproduction's config except "
          "`rl.opd.estimator`: the paper's OPD signal (the teacher's log-prob of the "
          "sampled token, the reference run) against a reverse KL on the teacher's top 16 "
          "tokens, renormalised (`top_k`, k = 16). Accuracy in points [95% interval]:\n"]


def _estimator_comparison(est: dict) -> list[str]:
  """Accuracy per estimator, then top-k - sampled token per capability with its test."""
  caps = [c for c in est["top_k_minus_sampled_token_points"] if c != "overall"]
  names = {"top_k": "top-k (k = 16)", "sampled_token": "sampled token (paper)"}
  lines = table({names[k]: v for k, v in est["accuracy_points"].items()}, [*caps, "overall"],
                "estimator")
  lines += ["", f"top-k − sampled token, paired on items and seeds "
            f"({est['multiple_comparisons']}; the overall row is not in the family):\n"]
  return lines + test_rows({c: est["top_k_minus_sampled_token_points"][c] for c in [*caps, "overall"]})


def diagnostics_section(out_dir: str) -> list[str]:
  """The fixed-prompt diagnostics by training phase (diagnostic_phases.json)."""
  path = os.path.join(out_dir, "diagnostic_phases.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    data = json.load(f)
  seeds = data["seeds"]
  lines = ["## Diagnostics on fixed prompts by training phase\n",
           "(`experiments/diagnostic_phases.py`, from `diagnostic_phases.json`; CoPD seeds "
           f"{seeds}, {data['diagnostic_prompts_per_branch']} fixed prompts per branch, "
           "measured after every step"
           + (f"; NOT FINISHED: steps 0 to {data['last_step_by_seed']} of each seed's run so "
              "far" if data.get("unfinished_runs") else "")
           + ".) The same prompts and sampling keys at every step, so each step's change is paired on prompts. Flawed-procedure rate: the share of "
           "a branch's sampled answers equal to the answer of the base's demonstrated "
           "flawed procedure (among the prompts where that differs from the reference), "
           "mean over branches. Mean change per step, by the phase of the step that made it"
           + (" (one seed: the interval is over steps and holds no seed-to-seed variation)"
              if len(seeds) == 1 else "") + ":\n",
           "| metric | change per RL step | change per OPD step | OPD − RL | "
           "before training → after (per seed) |", "|---|---|---|---|---|"]
  for name, row in data["mean_change_per_step"].items():
    levels = "; ".join(f"{lv['before']} → {lv['after']}" for lv in data["levels_by_seed"][name])
    lines.append(f"| {name} | {cell(row['rl_step_change'])} | {cell(row['opd_step_change'])} | "
                 f"{cell(row['opd_minus_rl'])} | {levels} |")
  lines += ["", "![diagnostics by phase]({results}/diagnostic_phases.png)"]
  return lines


def overlap_section(out_dir: str) -> list[str]:
  path = os.path.join(out_dir, "overlap_phases.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    data = json.load(f)
  lines = ["## Top-10 overlap and symmetric KL by training phase\n",
           f"(`experiments/overlap_phases.py`, from `overlap_phases.json`; seeds "
           f"{data['seeds']}.) Mean change per step, by the phase of the step that made it. The "
           "diagnostics draw fresh prompts at every step (the branch's own rollouts), so "
           "successive measurements are not paired on prompts.\n",
           "| metric | change per RL step | change per OPD step | OPD − RL |", "|---|---|---|---|"]
  for name, row in data["mean_overlap_change_per_step"].items():
    lines.append(f"| {name} | {cell(row['rl_step_change'])} | {cell(row['opd_step_change'])} | "
                 f"{cell(row['opd_minus_rl'])} |")
  return lines


def write(path: str, result: dict, out_dir: str, caps, two_caps) -> None:
  """Writes the document to `path`; figures are linked relative to it."""
  rel = os.path.relpath(os.path.abspath(out_dir), os.path.dirname(os.path.abspath(path)))
  seeds = result["seeds"]
  lines = [HEADER, "# Toy-suite results\n",
           f"Made by `{result['command']}`; seeds {seeds}; "
           f"{result['eval_examples_per_capability']} held-out items per capability. "
           "Cells: accuracy or a paired difference in points, mean over seeds [95% "
           f"interval]. Intervals: {result['interval_method']} "
           f"(simulated coverage of nominal 95% intervals: at least "
           f"{result.get('interval_coverage_simulated')}). Multiple comparisons: "
           f"{result['multiple_comparisons']}. A model finished on fewer seeds than the study's "
           "(seeds column) is compared on the seeds both sides finished; with one seed its "
           "interval holds the item noise only. The base is one shared policy. Source: "
           f"`{os.path.join(rel, 'results.json')}`.\n",
           "## Three branches (text, image, video)\n"]
  lines += table(result["accuracy_points"], [*caps, "overall"], "model", seeds)
  lines += ["", f"![final accuracy]({rel}/final_accuracy.png)\n"]
  if result["minus_copd_points"]:
    lines += ["### Paired difference to merged CoPD (model − CoPD, same items and seeds)\n"]
    lines += table(result["minus_copd_points"], [*caps, "overall"], "model − CoPD")
  lines += [""] + merged_section(result, caps)
  if result["transfer_matrix_points"]:
    lines += ["", "### Transfer: each expert's gain over the base\n"]
    lines += table({f"{k} expert": v for k, v in result["transfer_matrix_points"].items()},
                   [*caps, "overall"], "expert")
  if len(result["accuracy_points_two_branch"]) > 3:
    lines += ["", f"## Two branches ({' + '.join(two_caps)})\n"]
    lines += table(result["accuracy_points_two_branch"], [*two_caps, "overall"], "model")
    if result["minus_copd_two_branch_points"]:
      lines += ["", "Paired difference to two-branch CoPD (model − CoPD):\n"]
      lines += table(result["minus_copd_two_branch_points"], [*two_caps, "overall"],
                     "model − CoPD 2-branch")
  lines += ["", f"Top-10 overlap at the end: expert pairs {result['expert_pair_overlap_final']}, "
            f"CoPD branches {result['copd_pair_overlap_final']}.\n"]
  lines += claims_section(result, caps) + [""]
  lines += coverage_section(result) + [""]
  lines += [line.replace("{results}", rel) for line in dial_section(result)] + [""]
  lines += ablation_section(out_dir) + [""]
  for section in (estimator_section(out_dir), overlap_section(out_dir),
                  [line.replace("{results}", rel) for line in diagnostics_section(out_dir)]):
    lines += section + [""] if section else []
  lines += [f"![accuracy]({rel}/accuracy_vs_step.png)\n",
            f"![overlap]({rel}/overlap_vs_step.png)\n"]
  with open(path, "w") as f:
    f.write("\n".join(lines))
