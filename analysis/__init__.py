"""Reading glam runs back from MLflow and turning them into the paper's tables and figures.

`runs` loads runs into a tidy table, `fit` fits scaling laws, `figures` draws the paper-style
plots, `energy` estimates device time and energy, `cli` is `glam-analyze`.
"""
