"""The pipeline's one table and one figure, read from what each stage left in its subdirectory.

Per stage, its wall time and its own measure: held-out loss (pretraining, SFT, the GAtt and
distillation rounds), a reward model's held-out accuracy per rating level, the held-out combined
reward R_c before and after rejection sampling and PPO with the KL to the SFT model, how many GAtt and
distillation dialogs were kept, perplexity and the next-line task, and the final policy's answers.
`pipeline.png` draws the held-out R_c of every policy of the recipe (the `evaluate` stage's
comparison, the same prompts and seeds for each) and PPO's own held-out evaluations.
"""

from __future__ import annotations

import json
import os

import ml_collections

from llama2_jax import storage
from llama2_jax.data.records import RATING_LEVELS
from llama2_jax.eval.policies import markdown_table
from llama2_jax.metrics import format_duration, read_metrics
from llama2_jax.plots import save_figure

REPORT_FILE, FIGURE_FILE = "report.md", "pipeline.png"


def write(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """The table (also written to report.md) and pipeline.png; the lines printed."""
    root = storage.as_path(workdir)
    policies = _policies(root)
    rows = [(name, _seconds(root, name), measure) for name, measure in _measures(config, root, policies)]
    lines = ["| stage | wall | result |", "|---|---|---|"]
    lines += [f"| {name} | {format_duration(seconds) if seconds is not None else '–'} | {measure} |"
              for name, seconds, measure in rows]
    total = sum(seconds for _, seconds, _ in rows if seconds is not None)
    lines.append(f"| all | {format_duration(total)} | |")
    if policies:
        lines += ["", "Every policy on the same held-out prompts (`evaluate`, KL to the SFT model per answer):", "",
                  *markdown_table([{**row, "policy": name} for name, row in policies.items()], "sft")]
    answers = root / "chat" / "answers.jsonl"
    if answers.exists():
        lines += ["", "The final policy answers (`chat`):", ""]
        for line in answers.read_text().splitlines():
            record = json.loads(line)
            lines += [f"[user]  {_user_turn(record['prompt'])}", f"[model] {record['completion'].strip()}", ""]
    if policies:
        lines.append(f"figure: {_figure(root, policies)}")
    (root / REPORT_FILE).write_text("\n".join(lines) + "\n")
    return lines


def _measures(config, root, policies) -> list[tuple[str, str]]:
    """(stage, its measure) for each stage whose outputs are in the workdir, in the recipe's order."""
    measured = [(name, measure(config, root, policies)) for name, measure in MEASURES.items()]
    return [(name, text) for name, text in measured if text]


def _pretrain(config, root, policies) -> str | None:
    if not (root / "pretrain" / "metrics.jsonl").exists():
        return None
    records = read_metrics(os.fspath(root / "pretrain"))
    text = f"held-out loss {_first_to_last(records, 'eval_loss')}"
    tasks = sorted({key for record in records for key in record
                    if key.startswith("eval_") and key.endswith("_accuracy")})
    return text + "".join(f"; {task[len('eval_'):]} {_first_to_last(records, task, digits=2)}" for task in tasks)


def _fine_tuning(name: str):
    def measure(config, root, policies) -> str | None:
        if not (root / name / "metrics.jsonl").exists():
            return None
        loss = _first_to_last(read_metrics(os.fspath(root / name)), "eval_loss")
        return f"held-out answer loss {loss}" + _policy_change(policies, name)

    return measure


def _reward_model(name: str):
    def measure(config, root, policies) -> str | None:
        if not (root / name / "metrics.jsonl").exists():
            return None
        last = [record for record in read_metrics(os.fspath(root / name)) if "eval_accuracy" in record][-1]
        levels = [f"{level.replace('_', ' ')} {last[f'eval_accuracy_{level}']:.2f}" for level in RATING_LEVELS
                  if last.get(f"eval_accuracy_{level}_weight", 0) > 0]
        return f"held-out accuracy {last['eval_accuracy']:.3f}" + (f" ({', '.join(levels)})" if levels else "")

    return measure


def _rejection(config, root, policies) -> str | None:
    if not (root / "rejection" / "metrics.jsonl").exists():
        return None
    records = read_metrics(os.fspath(root / "rejection"))
    rounds = [record["eval_reward"] for record in records if "eval_reward" in record]
    return "held-out R_c " + " → ".join(f"{value:.3f}" for value in rounds) + _kl(policies, "rejection")


def _gatt_data(config, root, policies) -> str | None:
    if not (root / "gatt_data" / "dialogs.jsonl").exists():
        return None
    kept = _lines(root / "gatt_data" / "dialogs.jsonl")
    return f"{kept} training dialogs from {_input_count(config.gatt_data, 'dialogs')} multi-turn dialogs"


def _distill_data(config, root, policies) -> str | None:
    if not (root / "distill_data" / "dialogs.jsonl").exists():
        return None
    kept, asked = _lines(root / "distill_data" / "dialogs.jsonl"), _input_count(config.distill_data, "prompts")
    return f"{kept} of {asked} answers ({kept / max(asked, 1):.0%}) scored safer with the safety preprompt, kept"


def _ppo(config, root, policies) -> str | None:
    if not (root / "ppo" / "train" / "metrics.jsonl").exists():
        return None
    records = read_metrics(os.fspath(root / "ppo" / "train"))
    kl = [record["eval_kl_reference"] for record in records if "eval_kl_reference" in record]
    return (f"held-out R_c {_first_to_last(records, 'eval_reward_combined')}, KL to its start {kl[-1]:.2f}"
            + _kl(policies, "ppo"))


def _chat(config, root, policies) -> str | None:
    path = root / "chat" / "answers.jsonl"
    return f"{_lines(path)} answers (below)" if path.exists() else None


def _first_to_last(records, key: str, digits: int = 3) -> str:
    values = [record[key] for record in records if key in record]
    return f"{values[0]:.{digits}f} → {values[-1]:.{digits}f}" if values else "–"


def _policies(root) -> dict[str, dict]:
    path = root / "evaluate" / "policies.json"
    if not path.exists():
        return {}
    return {os.path.basename(row["policy"].rstrip("/")): row for row in json.loads(path.read_text())["policies"]}


def _kl(policies, name: str) -> str:
    return f"; KL to sft {policies[name]['kl_reference']:.2f}" if name in policies else ""


def _policy_change(policies, name: str) -> str:
    """What the evaluate stage saw change from the policy before (GAtt: instruction following;
    distillation: the safety score)."""
    before = {"gatt": "rejection", "distill": "gatt"}.get(name)
    if before not in policies or name not in policies:
        return ""
    if name == "distill":
        return f"; held-out R_s {policies[before]['reward_safety']:.3f} → {policies[name]['reward_safety']:.3f}"
    if policies[name].get("follows_instruction") is None:
        return ""
    return (f"; follows the instruction {policies[before]['follows_instruction']:.0%} → "
            f"{policies[name]['follows_instruction']:.0%}")


def _evaluate(config, root, policies) -> str:
    parts = []
    for kind, key, label in (("perplexity", "perplexity", "perplexity on held-out text"),
                             ("task", "accuracy", "task accuracy")):
        values = {model: json.loads((root / "evaluate" / f"{kind}_{model}.json").read_text()).get(key)
                  for model in ("pretrain", "ppo") if (root / "evaluate" / f"{kind}_{model}.json").exists()}
        if values:
            parts.append(f"{label}: " + ", ".join(f"{model} {value:.{1 if kind == 'perplexity' else 3}f}"
                                                  for model, value in values.items()))
    return "; ".join(parts)


def _figure(root, policies) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.4), layout="constrained")
    axis = figure.subplots()
    names = list(policies)
    rewards = [policies[name]["reward_combined"] for name in names]
    bars = axis.bar(names, rewards, color="tab:blue", alpha=0.8, label="held-out R_c (evaluate)")
    for bar, name in zip(bars, names):
        axis.annotate(f"KL {policies[name]['kl_reference']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize="small")
    ppo = root / "ppo" / "train" / "metrics.jsonl"
    if ppo.exists() and "ppo" in names:
        evaluations = [record for record in read_metrics(os.fspath(root / "ppo" / "train"))
                       if "eval_reward_combined" in record]
        if len(evaluations) > 1:
            last = evaluations[-1]["step"] or 1
            start = names.index("ppo") - 1
            axis.plot([start + record["step"] / last for record in evaluations],
                      [record["eval_reward_combined"] for record in evaluations], marker="o", color="tab:orange",
                      label="PPO's own held-out evaluations, by step")
    axis.set(title="held-out combined reward R_c by stage of the recipe", ylabel="mean R_c", ylim=(0, 1.05))
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize="small", loc="lower right")
    path = root / FIGURE_FILE
    save_figure(figure, path)
    return os.fspath(path)


def _seconds(root, name: str) -> float | None:
    path = root / name / "step.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def _lines(path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _input_count(section, key: str) -> int:
    total = _lines(storage.as_path(section[key]))
    return min(total, section.limit) if section.limit else total


def _user_turn(prompt: str) -> str:
    """A chat prompt's last user turn (generate writes a dialog as its JSON)."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        return prompt
    return next(message["content"] for message in reversed(messages) if message["role"] == "user").replace("\n", " / ")


MEASURES = {
    "pretrain": _pretrain, "sft": _fine_tuning("sft"), "reward_helpfulness": _reward_model("reward_helpfulness"),
    "reward_safety": _reward_model("reward_safety"), "rejection": _rejection, "gatt_data": _gatt_data,
    "gatt": _fine_tuning("gatt"), "distill_data": _distill_data, "distill": _fine_tuning("distill"), "ppo": _ppo,
    "evaluate": _evaluate, "chat": _chat,
}
