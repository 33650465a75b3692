"""External validation: internal (patient-grouped out-of-fold) vs external accuracy, subgroups, calibration,
conformal sets and heatmaps of the external errors.

The workflow layer above classify, audit and explain: ``run`` fits and scores in memory (``evaluate_validate``)
and writes the run folder (``write_validate_run``; ``run_validate`` does both), ``report`` formats it. The API function is ``cxr_transfer.validate(data, external, ...)``.
"""
