"""calib: Bayesian calibration of the BLIS step-time model from vLLM traces.

The flow, one module ("room") per stage::

    calib.traces    experiment dirs (OTLP)  -> canonical step dataset (NetCDF)
    calib.roofline  dataset                 -> roofline component matrix (µs)
    calib.data      dataset + components    -> ModelData (the fittable steps, laid out)
    calib.model     ModelData               -> NumPyro models, one per hierarchy
                    (mean step time: calib.steptime; sampler coordinates: calib.geometry)
    calib.fit       NUTS                    -> InferenceData + diagnostics gate, with the
                                               API overheads of calib.overheads
    calib.export / calib.e2e / calib.report -> BLIS YAML, interval checks, plots

Names used everywhere (components, hierarchies, splits, fittable steps) live in
``calib.vocab``; every default in ``calib.config``.

``calib.simulate`` writes the same on-disk format as instrumented vLLM.
"""

__version__ = "0.1.0"

#: Bumped whenever the meaning of a posterior file changes (model structure, parameter
#: names, coordinates). Loading a file of another version is an error. Since 5 a file
#: stores only the named natural parameters (``calib.vocab.PARAMETER_SITES``), so the
#: sampler's coordinates (calib.geometry) can change without a bump; 5 also added the
#: API-overhead estimate (``api_overheads``) and the empty-batch rule of calib.steptime.
MODEL_VERSION = 5

#: Bumped whenever the canonical dataset schema changes.
DATASET_SCHEMA_VERSION = 1
