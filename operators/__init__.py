"""chorus operators: pure JAX/numpy attribution math (no I/O); the service is in operators.service.

    from operators import attribute, indicators, shapley, bands
"""

from operators import bands, indicators, quadrature, shapley
from operators.attribution import Attribution, attribute

__all__ = ["Attribution", "attribute", "bands", "indicators", "quadrature", "shapley"]
