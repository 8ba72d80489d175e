"""calib: Bayesian calibration of the BLIS step-time model from vLLM traces.

The flow, one module ("room") per stage::

    calib.traces    experiment dirs (OTLP)  -> canonical step dataset (NetCDF)
    calib.roofline  dataset                 -> roofline component matrix (µs)
    calib.model     components              -> NumPyro models, one per hierarchy
    calib.fit       NUTS                    -> InferenceData + diagnostics gate
    calib.export / calib.e2e / calib.report -> BLIS YAML, interval checks, plots

``calib.simulate`` writes the same on-disk format as instrumented vLLM.
"""

__version__ = "0.1.0"

#: Bumped whenever the meaning of a posterior file changes (model structure,
#: parameter names, coordinates, raw sample sites). Loading a file of another version
#: is an error. 2: pinned pf_compute and bounded (logit) overheads. 3: ``z_b_pop`` of a
#: pinned component is its offset from the models' mean (calib.model._recentred_population).
#: 4: the same for centred, non-pinned components (``config.RECENTRED_POPULATION``).
MODEL_VERSION = 4

#: Bumped whenever the canonical dataset schema changes.
DATASET_SCHEMA_VERSION = 1
