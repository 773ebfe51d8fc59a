"""Follower-percentile bands, band shares of an attribution, and the visibility-panel comparison.

Bands. Agents are ranked by follower count, most first, 0-based; tied agents share their mean
rank r_i = #(more followers) + (#(equal followers) - 1) / 2, so equal follower counts always land
in the same band and nothing depends on agent order. Band (name, lo, hi) holds the agents with
floor(lo N) <= r_i < floor(hi N) (the last band takes the rest). DEFAULT_BANDS: top 0.1%,
0.1-1%, 1-10%, 10-50%, bottom 50%. With distinct counts the band sizes are exact (N = 1000: 1,
9, 90, 400, 500); with ties or small N a band can be empty or wider than nominal.

Band shares with mixed signs. Per-agent phi (an (N, d) attribution summed over features) can have
both signs (polarization: an agent pulling toward the mean lowers P). Shares of sum(phi) are then
unbounded (they reach +-500 when the total nearly cancels) and meaningless when it cancels. chorus
splits the mass instead: P+ = sum_i max(phi_i, 0), P- = sum_i max(-phi_i, 0), A = P+ + P- (the
absolute attribution mass), and per band b the positive and negative mass pos_b, neg_b.

- ``band_mass``: pos_b / P+ and neg_b / P- (each a distribution over bands, in [0, 1], sum 1;
  all 0 when that mass is 0), plus P+ and P-.
- ``band_shares``: the net share (pos_b - neg_b) / A, in [-1, 1]; the shares sum to
  (P+ - P-) / A; with phi >= 0 everywhere this is the plain share sum_b phi / sum phi; all 0
  when phi == 0.
- ``band_distribution``: the (sign, band) distribution [pos_b; neg_b] / A (sums to 1), and
  ``band_tvd`` the total-variation distance between two of them, 1/2 sum |p - q| in [0, 1]
  (nan when either attribution is all zero).

Visibility panel = the k agents with most followers (ties broken by lower index). Panel (or any
subset S) attribution = Aumann-Shapley of F evaluated on S alone: input z = x on S's rows and the
baseline b elsewhere, attributed from b (so agents outside S get exactly 0).

What the comparison measures (the attribution scaling bias). On the members of S, the panel
attribution p and the full-scale attribution f differ in scale (F's level depends on everyone)
and, when agents *interact*, in pattern. The best single rescale c* = <f, p> / <p, p> and its
relative residual ||f - c* p|| / ||f|| separate the two: for an additive F = sum_i g_i(x_i)
(linear or not, e.g. sum(log1p(x))) phi_i depends on agent i alone, so p = f on S and the
residual is 0 (c* = 1); it is positive only when agents interact (cascade reach: shared
followers; polarization: the common mean). Spearman's rho compares the ranks on S.

The band comparison (TVD) is only informative when S spans several bands: the top-100 panel of a
population over 100,000 lies in the top 0.1% band, so its TVD is 1 minus the full-scale top-band
share whatever F is (``PanelComparison.tvd`` is then nan). ``visibility_sample`` draws a
convenience-like sample instead: Poisson sampling with inclusion probability rising with
followers, pi_i = min(1, c (1 + followers_i)^exponent), c such that sum pi = size. Its TVD mixes
that selection bias (present for a linear F too) with the scaling bias; the residual does not.

Scaling bias of a sample, mass-weighted (``scaling_bias``, what the ``panel_disagreement``
alert uses). On the members m of a sample S, with full-scale phi f_m, the sample's own
attribution p_m (F on S alone) and inclusion probabilities pi_m, the per-agent rescale factor is
r_m = f_m / p_m (for p_m != 0). With weights w_m = |p_m| / pi_m (attribution mass, Horvitz-Thompson
weighted so the sums estimate population sums over everyone the sample stands for):

    c* = sum w r / sum w = sum (f sgn p / pi) / sum (|p| / pi)
    residual^2 = sum w (r - c*)^2 / sum w r^2 = sum (f - c* p)^2 / (pi |p|) / sum f^2 / (pi |p|)

c* is the best single rescale (the weighted mean factor; 1 - c* the share a small study
overstates by) and the residual the weighted spread of the factors around it, in [0, 1]: 0 iff one
rescale reconciles every member. For an additive F, p = f on S exactly, so c* = 1 and the
residual is 0; it is positive only when the members interact with agents outside S *unequally*
(a community whose members share followers, against members whose followers are unrelated).
Unlike the plain L2 residual it is not dominated by the few most-followed members.

Non-finite phi raises :class:`operators.attribution.NonFiniteError` naming the agents.

Every function taking ``followers`` (counts, (N,)) also takes a :class:`BandIndex` computed once
from them: the same result without ranking the agents again (the service ranks once per hop).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from operators.attribution import as_features, attribute, check_finite_phi, resolve_baseline

__all__ = [
    "DEFAULT_BANDS",
    "BAND_NAMES",
    "band_index",
    "BandIndex",
    "band_of",
    "band_shares",
    "band_mass",
    "BandMass",
    "band_distribution",
    "band_summary",
    "band_tvd",
    "PanelComparison",
    "panel_agents",
    "panel_comparison",
    "visibility_sample",
    "rescale_fit",
    "scaling_bias",
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


_BAND_INDEX_CACHE: dict[tuple, np.ndarray] = {}  # (dtype, shape, content digest, bands) -> index
_BAND_INDEX_CACHE_SIZE = 8


def band_index(followers, bands=DEFAULT_BANDS) -> np.ndarray:
    """Index into ``bands`` of each agent's band, int array (N,), read-only.

    O(N log N) (a sort and searches; O(N + max) by counting for integer counts up to 4 N); the
    last few results are kept, keyed by the followers'
    content (a 128-bit BLAKE2b digest, O(N)), since a hop asks for the same followers' bands once
    per topic, indicator, panel and sample."""
    f = _followers(followers)
    key = (f.dtype.str, f.shape, hashlib.blake2b(np.ascontiguousarray(f), digest_size=16).digest(),
           tuple(map(tuple, bands)))
    hit = _BAND_INDEX_CACHE.get(key)
    if hit is None:
        hit = _band_index(f, bands)
        hit.flags.writeable = False
        if len(_BAND_INDEX_CACHE) >= _BAND_INDEX_CACHE_SIZE:
            _BAND_INDEX_CACHE.pop(next(iter(_BAND_INDEX_CACHE)))
        _BAND_INDEX_CACHE[key] = hit
    return hit


@dataclass(frozen=True, eq=False)
class BandIndex:
    """Each agent's band, ranked once from the follower counts. Every band function that takes
    ``followers`` also takes a BandIndex in its place and then skips the ranking and the content
    digest (a hop asks ~100 times for the same agents' bands: O(N) each instead of O(N log N)).

    ``index``: int array (N,), read-only, into ``bands``. Build with :meth:`of`.
    """

    index: np.ndarray
    bands: tuple

    @classmethod
    def of(cls, followers, bands=DEFAULT_BANDS) -> "BandIndex":
        """The bands of ``followers`` (1-D, finite; raises ValueError otherwise)."""
        if isinstance(followers, BandIndex):
            return followers.check(bands)
        return cls(band_index(followers, bands), _bands_key(bands))

    @property
    def size(self) -> int:
        return int(self.index.size)

    def padded(self, size: int) -> "BandIndex":
        """The same bands for ``size`` >= N rows, rows N.. in the last band (padding rows of a
        device array: never panel members, phi = 0, so they change no share)."""
        idx = np.full(size, len(self.bands) - 1, self.index.dtype)
        idx[: self.size] = self.index
        idx.flags.writeable = False
        return BandIndex(idx, self.bands)

    def check(self, bands) -> "BandIndex":
        """Itself, if computed for ``bands``; else raises ValueError."""
        if self.bands != _bands_key(bands):
            raise ValueError("a BandIndex computed for other bands")
        return self


def _bands_key(bands) -> tuple:
    return tuple(map(tuple, bands))


def _index_of(followers, bands) -> np.ndarray:
    """The band index (N,) of ``followers`` (counts or a :class:`BandIndex`)."""
    if isinstance(followers, BandIndex):
        return followers.check(bands).index
    return band_index(followers, bands)


def _band_index(f: np.ndarray, bands) -> np.ndarray:
    n = f.size
    if np.issubdtype(f.dtype, np.integer) and f.min() >= 0 and f.max() <= 4 * n:
        # follower counts: counting, O(N + max), instead of a sort (1.1 s -> ~0.1 s at 1.67M)
        count = np.bincount(f, minlength=int(f.max()) + 1)
        more = n - np.cumsum(count)[f]  # agents with strictly more followers
        equal = count[f]
    else:
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
    check_finite_phi(p)
    return p


def _signed_mass(phi, followers, bands) -> np.ndarray:
    """(2, len(bands)): positive and negative attribution mass per band."""
    idx = _index_of(followers, bands)
    p = _per_agent(phi, idx.size)
    nz = np.flatnonzero(p)  # attributions are sparse (a topic's active agents, a panel): O(nnz) sums
    p, idx = p[nz], idx[nz]
    return np.stack([np.bincount(idx, weights=np.maximum(p, 0), minlength=len(bands)),
                     np.bincount(idx, weights=np.maximum(-p, 0), minlength=len(bands))])


def _named(bands, values) -> dict[str, float]:
    return {name: float(v) for (name, _, _), v in zip(bands, values)}


def band_distribution(phi, followers, bands=DEFAULT_BANDS) -> np.ndarray:
    """(2, len(bands)) array [pos_b; neg_b] / A: the (sign, band) distribution of |phi| (sums to
    1; all 0 when phi == 0). See the module docstring."""
    return _distribution(_signed_mass(phi, followers, bands))


def _distribution(mass: np.ndarray) -> np.ndarray:
    total = mass.sum()
    return mass / total if total > 0 else np.zeros_like(mass)


def band_tvd(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance 1/2 sum |p - q| of two :func:`band_distribution` arrays, in [0, 1];
    nan when either is all zero (an all-zero attribution has no distribution)."""
    if not np.any(p) or not np.any(q):
        return float("nan")
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def band_shares(phi, followers, bands=DEFAULT_BANDS) -> dict[str, float]:
    """{band name: (pos_b - neg_b) / (P+ + P-)}, in band order: the net share of the absolute
    attribution mass, in [-1, 1] (the plain share of sum(phi) when phi >= 0; all 0 when phi == 0).

    Raises ValueError for mismatched shapes, NonFiniteError naming agents whose phi is NaN/inf."""
    dist = band_distribution(phi, followers, bands)
    return _named(bands, dist[0] - dist[1])


def band_summary(phi, followers, bands=DEFAULT_BANDS) -> tuple[dict[str, float], "BandMass", np.ndarray]:
    """(:func:`band_shares`, :func:`band_mass`, :func:`band_distribution`) of one phi from one pass
    over it (a hop publishes all three for every topic and indicator; each pass over 1.67M agents
    costs ~20 ms)."""
    mass = _signed_mass(phi, followers, bands)
    dist = _distribution(mass)
    return _named(bands, dist[0] - dist[1]), _band_mass(mass, bands), dist


@dataclass(frozen=True)
class BandMass:
    """Positive and negative attribution mass, each as shares over bands (see module docstring)."""

    positive: dict[str, float]  # pos_b / P+ (all 0 when P+ == 0)
    negative: dict[str, float]  # neg_b / P- (all 0 when P- == 0)
    positive_mass: float  # P+ = sum max(phi, 0)
    negative_mass: float  # P- = sum max(-phi, 0)


def band_mass(phi, followers, bands=DEFAULT_BANDS) -> BandMass:
    """Positive and negative mass of phi per band, as shares of P+ and P- (each sums to 1 or 0)."""
    return _band_mass(_signed_mass(phi, followers, bands), bands)


def _band_mass(mass: np.ndarray, bands) -> BandMass:
    tot = mass.sum(axis=1)
    shares = [m / t if t > 0 else np.zeros_like(m) for m, t in zip(mass, tot)]
    return BandMass(_named(bands, shares[0]), _named(bands, shares[1]), float(tot[0]), float(tot[1]))


def panel_agents(followers, k: int = 100) -> np.ndarray:
    """Indices of the k agents with most followers (ties: lower index first), most first."""
    f = _followers(followers)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = min(int(k), f.size)
    if k < f.size:  # O(N): the k-th largest count, then everyone above it and the first ties at it
        kth = np.partition(f, f.size - k)[f.size - k]
        cand = np.concatenate([np.flatnonzero(f > kth), np.flatnonzero(f == kth)[: k - int(np.sum(f > kth))]])
    else:
        cand = np.arange(f.size)
    return cand[np.lexsort((cand, -f[cand]))]


def visibility_sample(followers, size: int, seed: int = 0, exponent: float = 1.0,
                      eligible=None) -> tuple[np.ndarray, np.ndarray]:
    """A visibility-biased Poisson sample: (sorted member indices, inclusion probabilities (N,)).

    pi_i = min(1, c (1 + max(followers_i, 0))^exponent) with c chosen (bisection) so that
    sum pi = min(size, #eligible); each agent is drawn independently with probability pi_i
    (numpy ``default_rng(seed)``), so the sample spans bands with more weight on the visible.
    ``eligible`` (bool, (N,)): agents that may be drawn (pi = 0 elsewhere); default all.
    """
    f = _followers(followers).astype(np.float64)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    ok = np.ones(f.size, bool) if eligible is None else np.asarray(eligible, bool)
    if ok.shape != f.shape:
        raise ValueError(f"eligible has shape {ok.shape}, expected {f.shape}")
    weight = np.where(ok, (1.0 + np.maximum(f, 0.0)) ** float(exponent), 0.0)
    c = _inclusion_scale(weight, min(int(size), int(ok.sum())))
    pi = np.where(weight > 0, 1.0, 0.0) if np.isinf(c) else np.minimum(1.0, c * weight)
    members = np.flatnonzero(np.random.default_rng(seed).random(f.size) < pi)
    return members, pi


def _inclusion_scale(weight: np.ndarray, target: int) -> float:
    """c with sum_i min(1, c w_i) = target (w >= 0, 0 < target <= #{w > 0}; inf when every
    positive weight must be taken). Water-filling, O(N log N): with w sorted descending and m
    the number capped at 1, c = (target - m) / sum_{i >= m} w_i for the least m with
    c w_m <= 1 (then c w_{m-1} >= 1 holds too)."""
    pos = np.sort(weight[weight > 0])[::-1]
    if target <= 0:
        return 0.0
    if target >= pos.size:
        return float("inf")
    suffix = np.cumsum(pos[::-1])[::-1]  # suffix[m] = sum of pos[m:]
    c = (target - np.arange(pos.size)) / suffix
    return float(c[np.argmax(c * pos <= 1.0)])


@dataclass(frozen=True)
class PanelComparison:
    """Full-scale attribution vs a panel's (see the module docstring)."""

    panel: np.ndarray  # agent indices of the panel (top-k: most followers first)
    bands: dict[str, float]  # band shares of the panel attribution
    full_bands: dict[str, float]  # band shares of the full-scale attribution
    tvd: float  # band_tvd(full, panel); nan unless the panel spans >= 2 bands (informative)
    spearman: float  # rank correlation of phi_full vs phi_panel on panel members (nan if undefined)
    rescale: float  # c* = argmin_c ||phi_full[P] - c phi_panel[P]|| = <f, p> / <p, p> (0 if p = 0)
    rescale_residual: float  # ||phi_full[P] - c* phi_panel[P]|| / ||phi_full[P]|| (0 if f = 0)
    phi_full: np.ndarray  # per-agent full-scale attribution (N,)
    phi_panel: np.ndarray  # per-agent panel attribution (N,), 0 off the panel
    bands_spanned: int = 0  # distinct bands among the panel members

    @property
    def informative(self) -> bool:
        """Whether the band comparison says anything (the panel spans at least two bands)."""
        return self.bands_spanned >= 2


def rescale_fit(full: np.ndarray, panel: np.ndarray) -> tuple[float, float, float]:
    """(c*, relative residual, Spearman rho) of full vs panel attributions on the panel members."""
    if full.size > 1 and np.ptp(full) > 0 and np.ptp(panel) > 0:
        from scipy.stats import spearmanr  # here: importing scipy.stats costs every process ~1.4 s of CPU

        rho = float(spearmanr(full, panel).statistic)
    else:
        rho = float("nan")
    pp = float(panel @ panel)
    c = float(full @ panel) / pp if pp > 0 else 0.0
    f_norm = float(np.linalg.norm(full))
    resid = float(np.linalg.norm(full - c * panel)) / f_norm if f_norm > 0 else 0.0
    return c, resid, rho


def scaling_bias(full, own, inclusion=None) -> tuple[float, float]:
    """(c*, residual) of the mass-weighted, Horvitz-Thompson weighted best single rescale of a
    sample's own attribution ``own`` to the full-scale ``full`` on its members (module
    docstring, "Scaling bias of a sample").

    full, own: per-member attributions (m,) (or (m, d), summed over features); inclusion: the
    members' inclusion probabilities (m,) in (0, 1] (None: all 1, unweighted). Members with
    own = 0 carry no rescale factor and are left out. Returns (0.0, 0.0) when fewer than two
    members are left (no spread to measure). Raises ValueError for mismatched shapes or an
    inclusion probability outside (0, 1], NonFiniteError for a non-finite attribution.
    """
    f, p = _per_agent(full), _per_agent(own)
    if f.shape != p.shape:
        raise ValueError(f"full has {f.size} members but own has {p.size}")
    pi = np.ones_like(f) if inclusion is None else np.asarray(inclusion, dtype=np.float64).reshape(-1)
    if pi.shape != f.shape:
        raise ValueError(f"inclusion has {pi.size} entries, expected {f.size}")
    if not (np.all(pi > 0) and np.all(pi <= 1)):
        raise ValueError("inclusion probabilities must lie in (0, 1]")
    keep = p != 0
    if keep.sum() < 2:
        return 0.0, 0.0
    f, p, pi = f[keep], p[keep], pi[keep]
    a = np.abs(p)
    c = float(np.sum(f * np.sign(p) / pi) / np.sum(a / pi))
    den = float(np.sum(f * f / (pi * a)))
    resid = float(np.sqrt(np.sum((f - c * p) ** 2 / (pi * a)) / den)) if den > 0 else 0.0
    return c, resid


def panel_comparison(
    F, x, followers, k: int = 100, baseline=None, steps: int = 32, phi_full=None,
    rule: str = "gauss-legendre", members=None, phi_panel=None, full_distribution=None,
) -> PanelComparison:
    """Compare full-scale Aumann-Shapley with a panel's (attribution scaling bias).

    Panel: the top-k by followers, or ``members`` (agent indices, e.g. a
    :func:`visibility_sample`). phi_full: a precomputed full-scale attribution (N,) or (N, d)
    for the same F, x, baseline (saves one attribution); computed with ``steps``/``rule`` when
    None. Raises ValueError for mismatched shapes and NonFiniteError (naming F(x), F(b) or the
    agents) when an attribution is not finite. phi_panel: a precomputed panel attribution (0 off
    the panel), e.g. computed on a smaller equivalent input. full_distribution: phi_full's
    :func:`band_distribution` for these bands, when already computed (e.g. by :func:`band_summary`).
    """
    xa = as_features(x)
    bi = BandIndex.of(followers)
    f = None if isinstance(followers, BandIndex) else _followers(followers)
    if bi.size != xa.shape[0]:
        raise ValueError(f"followers has {bi.size} entries but x has {xa.shape[0]} agents")
    b = resolve_baseline(F, xa, baseline)
    if phi_full is None:
        phi_full = attribute(F, xa, b, steps=steps, rule=rule).phi
    full = _per_agent(phi_full, bi.size)
    if members is None:
        if f is None:
            raise ValueError("the top-k panel needs follower counts, not a BandIndex (or pass members)")
        panel = panel_agents(f, k)
    else:
        panel = np.asarray(members, dtype=np.int64).reshape(-1)
        if panel.size and (panel.min() < 0 or panel.max() >= bi.size):
            raise ValueError(f"members must be agent indices in [0, {bi.size})")
    in_panel = np.zeros(bi.size, bool)
    in_panel[panel] = True
    if phi_panel is None:
        mask = jnp.asarray(in_panel).reshape((-1,) + (1,) * (xa.ndim - 1))
        phi_panel = attribute(F, jnp.where(mask, xa, b), b, steps=steps, rule=rule).phi
    phi_panel = _per_agent(phi_panel, bi.size)

    spanned = int(np.unique(bi.index[panel]).size)
    bands = bi.bands
    d_full = band_distribution(full, bi, bands) if full_distribution is None else np.asarray(full_distribution)
    if d_full.shape != (2, len(bands)):
        raise ValueError(f"full_distribution must have shape (2, {len(bands)}), got {d_full.shape}")
    d_panel = band_distribution(phi_panel, bi, bands)
    tvd = band_tvd(d_full, d_panel) if spanned >= 2 else float("nan")
    c, resid, rho = rescale_fit(full[panel], phi_panel[panel])
    return PanelComparison(panel, _named(bands, d_panel[0] - d_panel[1]), _named(bands, d_full[0] - d_full[1]),
                           tvd, rho, c, resid, full, phi_panel, spanned)
