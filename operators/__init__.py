"""chorus operators: pure JAX/numpy attribution math (no I/O); the service is in operators.service.

    from operators import attribute, indicators, shapley, bands
"""

from operators import bands, indicators, quadrature, shapley
from operators.attribution import Attribution, NonFiniteError, attribute

__all__ = ["Attribution", "NonFiniteError", "attribute", "bands", "indicators", "quadrature", "shapley"]
