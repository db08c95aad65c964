"""Past one process: Dask clusters (``cluster``), extraction cut into units of whole store chunks (``extract``)
and the classifier's independent fits as Dask tasks (``fits``). Only these modules import Dask; a run whose
``scale.cluster`` is ``none`` never does."""
