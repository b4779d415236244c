"""The 13-teacher showcase table (docs/mopd.md, README): held-out reward per toy domain of the base, its GSPO
teacher, the MOPD student, and the two RL baselines on the teachers' budget.

    .venv/bin/python scripts/mopd_showcase_table.py            # after: bash scripts/mopd_showcase.sh

Reads the runs' metrics.jsonl (eval/reward/by_source/toy/<domain>) and prints a Markdown table; writes the bar
chart docs/mopd_showcase.png. A run that is missing shows as "—" (never a made-up number).
"""
from __future__ import annotations

import argparse
import json
import os

from posttrain.toy.tasks import DOMAINS

ORDER = "add tspan box sub mul max count frac solve think tool ocr code".split()


def evals(run_dir: str) -> list[dict]:
    """Every evaluation row of a run, in step order ([] if the run does not exist)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if "eval/reward/mean" in r]


def domain_reward(row: dict | None, domain: str) -> float | None:
    return None if row is None else row.get(f"eval/reward/by_source/toy/{domain}")


def collect(runs: str) -> dict[str, dict[str, float | None]]:
    student, seq, mixed = (evals(os.path.join(runs, p)) for p in
                           ("mopd-13", "baselines/sequential-13", "baselines/mixed-13"))
    base_row = next((e[0] for e in (student, mixed, seq) if e and e[0]["step"] == 0), None)
    final = lambda e: e[-1] if len(e) > 1 else None   # noqa: E731 — the last evaluation after training, if any
    table = {}
    for d in ORDER:
        teacher = evals(os.path.join(runs, "teachers", d))
        table[d] = {"base": domain_reward(base_row, d), "teacher": domain_reward(final(teacher), d),
                    "student": domain_reward(final(student), d), "sequential": domain_reward(final(seq), d),
                    "mixed": domain_reward(final(mixed), d)}
    return table


def kept(base, teacher, other) -> str:
    """Share of the teacher's gain over the base that another model keeps: (other − base) / (teacher − base)."""
    if None in (base, teacher, other) or teacher - base < 0.02:
        return "—"
    return f"{100 * (other - base) / (teacher - base):.0f}%"


def markdown(table: dict) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.3f}"   # noqa: E731
    lines = ["| domain | reward | base | teacher | MOPD student | sequential RL | mixed RL | gain kept: student / seq / mixed |",
             "|---|---|---|---|---|---|---|---|"]
    for d, r in table.items():
        lines.append(f"| {d} | {DOMAINS[d].reward.split(':')[-1]} | {fmt(r['base'])} | {fmt(r['teacher'])} | "
                     f"{fmt(r['student'])} | {fmt(r['sequential'])} | {fmt(r['mixed'])} | "
                     f"{kept(r['base'], r['teacher'], r['student'])} / {kept(r['base'], r['teacher'], r['sequential'])}"
                     f" / {kept(r['base'], r['teacher'], r['mixed'])} |")
    cols = ("base", "teacher", "student", "sequential", "mixed")
    means = {c: (sum(r[c] for r in table.values()) / len(table)
                 if all(r[c] is not None for r in table.values()) else None) for c in cols}
    lines.append("| **mean** | | " + " | ".join(f"**{fmt(means[c])}**" for c in cols) + " | "
                 f"{kept(means['base'], means['teacher'], means['student'])} / "
                 f"{kept(means['base'], means['teacher'], means['sequential'])} / "
                 f"{kept(means['base'], means['teacher'], means['mixed'])} |")
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [("base", "base", "#bbbbbb"), ("teacher", "its teacher", "#2b8cbe"), ("student", "MOPD student", "#e6550d"),
            ("sequential", "sequential RL", "#74c476"), ("mixed", "mixed RL", "#9e9ac8")]
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.16
    for i, (key, label, color) in enumerate(cols):
        xs = [j + (i - 2) * width for j in range(len(table))]
        ax.bar(xs, [r[key] or 0.0 for r in table.values()], width, label=label, color=color)
    ax.set_xticks(range(len(table)), list(table))
    ax.set_ylabel("held-out reward")
    ax.set_ylim(0, 1.05)
    ax.legend(ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.15), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/toy")
    parser.add_argument("--plot", default="docs/mopd_showcase.png")
    args = parser.parse_args()
    table = collect(args.runs)
    print(markdown(table))
    if args.plot:
        plot(table, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
