"""Follower-percentile bands, band shares of an attribution, and the visibility-panel comparison.

Bands. Agents are ranked by follower count, most first, 0-based; tied agents share their mean
rank r_i = #(more followers) + (#(equal followers) - 1) / 2, so equal follower counts always land
in the same band and nothing depends on agent order. Band (name, lo, hi) holds the agents with
floor(lo N) <= r_i < floor(hi N) (the last band takes the rest). DEFAULT_BANDS: top 0.1%,
0.1-1%, 1-10%, 10-50%, bottom 50%. With distinct counts the band sizes are exact (N = 1000: 1,
9, 90, 400, 500); with ties or small N a band can be empty or wider than nominal.

Band share = sum of phi over the band / sum of phi over all agents (per-agent phi: an (N, d)
attribution is summed over features). Shares sum to 1 and can be negative or above 1 when phi
has mixed signs; when sum(phi) == 0 every share is 0.

Visibility panel = the k agents with most followers (ties broken by lower index). Panel
attribution = Aumann-Shapley of F evaluated on the panel alone: input z = x on panel rows and
the baseline b elsewhere, attributed from b (so non-panel agents get exactly 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from operators.attribution import as_features, attribute, resolve_baseline

__all__ = [
    "DEFAULT_BANDS",
    "BAND_NAMES",
    "band_index",
    "band_of",
    "band_shares",
    "PanelComparison",
    "panel_agents",
    "panel_comparison",
]

# (name, lo, hi): fractions of the population from the top
DEFAULT_BANDS: tuple[tuple[str, float, float], ...] = (
    ("top0.1", 0.0, 0.001),
    ("0.1-1", 0.001, 0.01),
    ("1-10", 0.01, 0.1),
    ("10-50", 0.1, 0.5),
    ("bottom50", 0.5, 1.0),
)
BAND_NAMES: tuple[str, ...] = tuple(name for name, _, _ in DEFAULT_BANDS)


def _followers(followers) -> np.ndarray:
    f = np.asarray(followers)
    if f.ndim != 1 or f.size < 1:
        raise ValueError(f"followers must be a non-empty 1-D array, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("followers must be finite")
    return f


def band_index(followers, bands=DEFAULT_BANDS) -> np.ndarray:
    """Index into ``bands`` of each agent's band, int array (N,)."""
    f = _followers(followers)
    n = f.size
    asc = np.sort(f)
    more = n - np.searchsorted(asc, f, side="right")
    equal = np.searchsorted(asc, f, side="right") - np.searchsorted(asc, f, side="left")
    rank = more + (equal - 1) / 2.0
    upper = np.array([int(np.floor(hi * n + 1e-9)) for _, _, hi in bands])
    upper[-1] = n
    return np.searchsorted(upper, rank, side="right")


def band_of(followers, bands=DEFAULT_BANDS) -> np.ndarray:
    """Each agent's band name, str array (N,)."""
    names = np.array([name for name, _, _ in bands])
    return names[band_index(followers, bands)]


def _per_agent(phi, n: int | None = None) -> np.ndarray:
    p = np.asarray(phi, dtype=np.float64)
    if p.ndim == 2:
        p = p.sum(axis=1)
    if p.ndim != 1 or (n is not None and p.shape[0] != n):
        raise ValueError(f"phi must have shape (N,) or (N, d) with N = {n}, got {np.shape(phi)}")
    return p


def band_shares(phi, followers, bands=DEFAULT_BANDS) -> dict[str, float]:
    """{band name: sum of phi in band / sum of phi}, in band order (all 0 when sum(phi) == 0)."""
    f = _followers(followers)
    p = _per_agent(phi, f.size)
    sums = np.bincount(band_index(f, bands), weights=p, minlength=len(bands))
    total = p.sum()
    shares = sums / total if total != 0 else np.zeros(len(bands))
    return {name: float(s) for (name, _, _), s in zip(bands, shares)}


def panel_agents(followers, k: int = 100) -> np.ndarray:
    """Indices of the k agents with most followers (ties: lower index first), most first."""
    f = _followers(followers)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return np.argsort(-f, kind="stable")[: min(int(k), f.size)]


@dataclass(frozen=True)
class PanelComparison:
    """Full-scale attribution vs the visibility panel's (see the module docstring)."""

    panel: np.ndarray  # agent indices of the panel, most followers first
    bands: dict[str, float]  # band shares of the panel attribution
    full_bands: dict[str, float]  # band shares of the full-scale attribution
    tvd: float  # 1/2 sum_band |full share - panel share|
    spearman: float  # rank correlation of phi_full vs phi_panel on panel members (nan if undefined)
    rescale: float  # c* = argmin_c ||phi_full[P] - c phi_panel[P]|| = <f, p> / <p, p> (0 if p = 0)
    rescale_residual: float  # ||phi_full[P] - c* phi_panel[P]|| / ||phi_full[P]|| (0 if f = 0)
    phi_full: np.ndarray  # per-agent full-scale attribution (N,)
    phi_panel: np.ndarray  # per-agent panel attribution (N,), 0 off the panel


def panel_comparison(
    F, x, followers, k: int = 100, baseline=None, steps: int = 32, phi_full=None,
    rule: str = "gauss-legendre", phi_panel=None,
) -> PanelComparison:
    """Compare full-scale Aumann-Shapley with the panel's (attribution scaling bias).

    phi_full: a precomputed full-scale attribution (N,) or (N, d) for the same F, x, baseline,
    steps and quadrature ``rule`` (saves one attribution); computed when None. phi_panel: the
    same for the panel attribution (0 off the panel), e.g. computed on a smaller equivalent input.
    """
    xa = as_features(x)
    f = _followers(followers)
    if f.size != xa.shape[0]:
        raise ValueError(f"followers has {f.size} entries but x has {xa.shape[0]} agents")
    b = resolve_baseline(F, xa, baseline)
    if phi_full is None:
        phi_full = attribute(F, xa, b, steps=steps, rule=rule).phi
    full = _per_agent(phi_full, f.size)
    panel = panel_agents(f, k)
    in_panel = np.zeros(f.size, bool)
    in_panel[panel] = True
    if phi_panel is None:
        mask = jnp.asarray(in_panel).reshape((-1,) + (1,) * (xa.ndim - 1))
        phi_panel = attribute(F, jnp.where(mask, xa, b), b, steps=steps, rule=rule).phi
    phi_panel = _per_agent(phi_panel, f.size)

    full_bands, panel_bands = band_shares(full, f), band_shares(phi_panel, f)
    tvd = 0.5 * sum(abs(full_bands[n] - panel_bands[n]) for n in full_bands)
    fp, pp = full[panel], phi_panel[panel]
    if fp.size > 1 and np.ptp(fp) > 0 and np.ptp(pp) > 0:
        rho = float(spearmanr(fp, pp).statistic)
    else:
        rho = float("nan")
    pp_norm2 = float(pp @ pp)
    c = float(fp @ pp) / pp_norm2 if pp_norm2 > 0 else 0.0
    f_norm = float(np.linalg.norm(fp))
    resid = float(np.linalg.norm(fp - c * pp)) / f_norm if f_norm > 0 else 0.0
    return PanelComparison(panel, panel_bands, full_bands, float(tvd), rho, c, resid, full, phi_panel)
