"""``python -m robustagg simulate``: federated training on scikit-learn's digits under attack,
with every aggregator, judged against what the seed defenses' papers claim (docs/simulate.md).

``experiment`` holds the presets and runs, ``claims`` judges them, ``plot`` draws the figure and
``cli`` is the command line; the federation itself is ``robustagg.simulation``.
"""
from .claims import judge
from .experiment import ATTACKS, DEFENSES, PRESETS, Config, document, run_all, run_one

__all__ = ["ATTACKS", "DEFENSES", "PRESETS", "Config", "document", "judge", "run_all", "run_one"]
