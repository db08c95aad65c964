"""Studies: named variants of one config (spec), run with shared stores (runner), compared on the same cells
(compare)."""
