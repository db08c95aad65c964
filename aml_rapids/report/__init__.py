"""One self-contained HTML page for a run or a study folder, rendered from what the stages wrote."""
