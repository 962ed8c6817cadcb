"""Whether each seed defense does on digits what its paper claims, judged on the runs.

Every number is the median over the seeds of a run's final value (accuracy, backdoor success
rate) or of its total over the rounds (Byzantine clients selected). A claim whose runs are
missing is left out; one that fails is reported with ``holds: false``. The thresholds are the
claims' own: half the ASR, 5 points of accuracy for the backdoor defenses, 3 for SignGuard and the
NaN client, 10 for an attack to count as real.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

# A plain weighted mean that lets NaN through: what a hand-written FedAvg does with a NaN client.
NAIVE_MEAN = "NaiveMean"
# the naive mean is "destroyed" when it ends no better than twice chance on 10 classes
DESTROYED_ACCURACY = 0.2

SEED_PAPERS = {
    "InvariantAggregator": "Invariant Aggregator (Wang et al., AISTATS 2024)",
    "RobustLR": "Robust Learning Rate (Ozdayi et al., AAAI 2021)",
    "SparseFed": "SparseFed (Panda et al., AISTATS 2022)",
    "SignGuard": "SignGuard (Xu et al., ICDCS 2022)",
    "CosDen": "AGRAmplifier (Gong et al., 2024)",
}


class Cells:
    """The runs by (aggregator, attack), and their medians over seeds."""

    def __init__(self, runs: list[dict]):
        self.runs = defaultdict(list)
        for run in runs:
            self.runs[run["aggregator"], run["attack"]].append(run)

    def has(self, aggregator: str, *attacks: str) -> bool:
        return all((aggregator, attack) in self.runs for attack in attacks)

    def aggregators(self) -> list[str]:
        return list(dict.fromkeys(agg for agg, _ in self.runs))

    def attacks(self) -> list[str]:
        return list(dict.fromkeys(attack for _, attack in self.runs))

    def values(self, aggregator: str, attack: str, what: str) -> list[float]:
        runs = self.runs[aggregator, attack]
        if what == "byzantine_selected":
            return [sum(r["byzantine_selected"] for r in run["rounds"]) for run in runs]
        return [run[what] for run in runs]

    def median(self, aggregator: str, attack: str, what: str) -> float:
        return statistics.median(self.values(aggregator, attack, what))

    def acc(self, aggregator: str, attack: str) -> float:
        return self.median(aggregator, attack, "final_accuracy")

    def asr(self, aggregator: str, attack: str) -> float:
        return self.median(aggregator, attack, "final_asr")

    def show(self, aggregator: str, attack: str, what: str = "final_accuracy") -> str:
        """'0.941 (0.93, 0.94, 0.95)': the median and the per-seed values."""
        per_seed = ", ".join(f"{v:.3g}" for v in self.values(aggregator, attack, what))
        return f"{self.median(aggregator, attack, what):.3g} ({per_seed})"

    def errors(self, aggregator: str, attack: str) -> tuple[int, int, str | None]:
        """(rounds where the aggregator raised, rounds in all, the first message) over the seeds."""
        rounds = [r for run in self.runs[aggregator, attack] for r in run["rounds"]]
        messages = [r["error"] for r in rounds if r.get("error")]
        return len(messages), len(rounds), messages[0] if messages else None

    def selects(self, aggregator: str, attack: str) -> bool:
        return all(r["byzantine_selected"] is not None for run in self.runs[aggregator, attack] for r in run["rounds"])


def _claim(claim: str, seed_paper: str, holds: bool, evidence: str) -> dict:
    return {"claim": claim, "seed_paper": seed_paper, "holds": bool(holds), "evidence": evidence}


def backdoor_is_real(cells: Cells) -> list[dict]:
    if not cells.has("FedAvg", "backdoor"):
        return []
    return [_claim("The backdoor is real: against FedAvg its final attack success rate (ASR) is at least 0.5",
                   "Model replacement (Bagdasaryan et al., AISTATS 2020): the attack the defenses face",
                   cells.asr("FedAvg", "backdoor") >= 0.5,
                   f"FedAvg final ASR {cells.show('FedAvg', 'backdoor', 'final_asr')}, final accuracy "
                   f"{cells.show('FedAvg', 'backdoor')} under the backdoor")]


def untargeted_is_real(cells: Cells) -> list[dict]:
    attacks = [a for a in cells.attacks() if a not in ("none", "backdoor") and cells.has("FedAvg", a)]
    if not cells.has("FedAvg", "none") or not attacks:
        return []
    clean = cells.acc("FedAvg", "none")
    drops = {a: clean - cells.acc("FedAvg", a) for a in attacks}
    return [_claim("An untargeted attack is real: at least one costs FedAvg 10 points of final accuracy",
                   "The threat model of the seed papers", max(drops.values()) >= 0.10,
                   f"FedAvg {clean:.3f} without attack; points lost: "
                   + ", ".join(f"{a} {100 * d:.1f}" for a, d in drops.items()))]


def backdoor_defenses(cells: Cells) -> list[dict]:
    if not cells.has("FedAvg", "none", "backdoor"):
        return []
    base_asr, base_acc = cells.asr("FedAvg", "backdoor"), cells.acc("FedAvg", "none")
    out = []
    for name in ("InvariantAggregator", "RobustLR", "SparseFed"):
        if not cells.has(name, "none", "backdoor"):
            continue
        asr, acc = cells.asr(name, "backdoor"), cells.acc(name, "none")
        evidence = (f"final ASR {cells.show(name, 'backdoor', 'final_asr')} against FedAvg's {base_asr:.3g} "
                    f"(at most {base_asr / 2:.3g} needed); clean accuracy {cells.show(name, 'none')} against "
                    f"FedAvg's {base_acc:.3g} (at least {base_acc - 0.05:.3g} needed)")
        if name == "RobustLR" and cells.has("RobustLR-noclip", "backdoor"):
            evidence += (f"; without its norm clipping RobustLR's final ASR is "
                         f"{cells.show('RobustLR-noclip', 'backdoor', 'final_asr')}")
        out.append(_claim(f"{name} cuts FedAvg's final backdoor ASR at least in half and keeps clean accuracy "
                          "within 5 points of FedAvg", SEED_PAPERS[name],
                          asr <= base_asr / 2 and acc >= base_acc - 0.05, evidence))
    return out


def signguard(cells: Cells) -> list[dict]:
    attacks = [a for a in ("lie", "min_max") if cells.has("SignGuard", a)]
    if not attacks or not cells.has("FedAvg", "none"):
        return []
    base = cells.acc("FedAvg", "none")
    parts = [f"FedAvg without attack {cells.show('FedAvg', 'none')} (at least {base - 0.03:.3g} needed)"]
    for a in attacks:
        baselines = [b for b in ("CoordinateMedian", "TrimmedMean", "Krum", "FedAvg") if cells.has(b, a)]
        parts.append(f"{a}: SignGuard {cells.show('SignGuard', a)}; "
                     + ", ".join(f"{b} {cells.acc(b, a):.3g}" for b in baselines))
    return [_claim(f"Under {' and '.join(attacks)}, SignGuard's final accuracy is within 3 points of FedAvg "
                   "without attack", SEED_PAPERS["SignGuard"],
                   all(cells.acc("SignGuard", a) >= base - 0.03 for a in attacks), "; ".join(parts))]


def amplifier(cells: Cells) -> list[dict]:
    amp, plain = "CosDen", "CosDen-noamp"
    attacks = [a for a in cells.attacks() if a != "none" and cells.has(amp, a) and cells.has(plain, a)
               and cells.selects(amp, a) and cells.selects(plain, a)]
    if not attacks or not cells.has(amp, "none") or not cells.has(plain, "none"):
        return []
    fewer = {a: cells.median(amp, a, "byzantine_selected") <= cells.median(plain, a, "byzantine_selected")
             for a in attacks}
    kept = cells.acc(amp, "none") >= cells.acc(plain, "none")
    rounds = len(cells.runs[amp, attacks[0]][0]["rounds"])
    evidence = (f"Byzantine clients selected over {rounds} rounds, amplified vs not: "
                + ", ".join(f"{a} {cells.median(amp, a, 'byzantine_selected'):g} vs "
                            f"{cells.median(plain, a, 'byzantine_selected'):g}" for a in attacks)
                + f"; clean accuracy {cells.show(amp, 'none')} vs {cells.show(plain, 'none')}")
    return [_claim("CosDen with max-pooling amplification selects no more Byzantine clients under attack than "
                   "CosDen without it (kernel 1), and loses no more clean accuracy", SEED_PAPERS["CosDen"],
                   all(fewer.values()) and kept, evidence)]


def nonfinite(cells: Cells) -> list[dict]:
    robust = [a for a in cells.aggregators() if a != NAIVE_MEAN and cells.has(a, "none", "nan_inject")]
    if not robust:
        return []
    lost = {a: cells.acc(a, "none") - cells.acc(a, "nan_inject") for a in robust}
    failing = [a for a, d in lost.items() if d > 0.03]
    evidence = (f"{len(robust) - len(failing)} of {len(robust)} aggregators within 3 points of their run without "
                f"attack (largest loss {100 * max(lost.values()):.1f} points, {max(lost, key=lost.get)})")
    if failing:
        evidence += "; more than 3 points lost: " + ", ".join(f"{a} {100 * lost[a]:.1f}" for a in failing)
    for a in failing:
        raised, total, message = cells.errors(a, "nan_inject")
        if raised:
            evidence += f"; {a} raised in {raised} of {total} rounds ({message})"
    holds = not failing
    if cells.has(NAIVE_MEAN, "nan_inject"):
        naive = cells.acc(NAIVE_MEAN, "nan_inject")
        holds = holds and naive <= DESTROYED_ACCURACY
        evidence += f"; the naive mean ends at {cells.show(NAIVE_MEAN, 'nan_inject')}"
    else:
        evidence += "; no naive mean in these runs"
    return [_claim("With a NaN client every robustagg aggregator keeps training under the default policy "
                   "(within 3 points of its run without attack), and a naive mean is destroyed",
                   "robustagg's non-finite policy", holds, evidence)]


CHECKS = (backdoor_is_real, untargeted_is_real, backdoor_defenses, signguard, amplifier, nonfinite)


def judge(runs: list[dict]) -> list[dict]:
    """Every claim these runs can test, in a fixed order."""
    cells = Cells(runs)
    return [claim for check in CHECKS for claim in check(cells)]
