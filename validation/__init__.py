"""External validation: internal (patient-grouped out-of-fold) vs external accuracy, subgroups, calibration,
conformal sets and heatmaps of the external errors.

The workflow layer above classify, audit and explain: ``run`` fits and scores (``run_validate``), ``report``
formats the run folder. The API function is ``cxr_transfer.validate(data, external, ...)``.
"""
