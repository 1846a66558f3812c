"""The report: gains over the baseline, statistics, plots, and where results are read and reports written."""
