"""``aura chaos``: named fault scenarios on the real stack, each ending in an accounting.

``run_scenario(name)`` returns a ``ChaosResult``: sent, committed once, dead-lettered by
reason, duplicates, lost, and whether every message met the fate the scenario expects.
"""

from aura.chaos.scenarios import SCENARIOS, ChaosResult, chaos_report, run_scenario

__all__ = ["SCENARIOS", "ChaosResult", "chaos_report", "run_scenario"]
