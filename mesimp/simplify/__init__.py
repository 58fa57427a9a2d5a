"""meSimp: counters -> masks (the keep rule and the Simplifier schedule), then shrink
(masked model -> physically smaller plain model).

``SimplifyConfig`` and ``active_widths`` are re-exported here, where they have always
been imported from.
"""

from mesimp.simplify.rule import SimplifyConfig, active_widths

__all__ = ["SimplifyConfig", "active_widths"]
