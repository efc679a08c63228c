"""The options of ``audit`` (data quality) and ``report`` (that plus the pictures): one
dataclass each, checked in one place, built from the command's flags or a library call."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..choices import AUDIT_CHECKS, DUPLICATE_THRESHOLD, LABEL_METHODS, MAP_METHODS, NEAR_DUPLICATE_SEARCH, canonical
from ..memory import check_budget
from ..options import OUTSIDE_IDENTITY, check_device, check_types, choose, require

# Cosine similarity, in the whitened principal-component space of ``space.py``, above which
# two rows count as near-duplicates. Calibrated on the demo digits through a random-init
# resnet18 (1,797 images at 64 px + 30 planted copies of train images in val: exact, shrunk to
# 48 px as JPEG q75, enlarged to 100 px as JPEG q85), in the default 128 components: every copy
# scored >= 0.992, the closest pair of distinct digits 0.911 (the same digits at 32 px: 0.909;
# a 96-row subset, 24 components: copies >= 0.998, distinct <= 0.923). 0.96 sits between with
# room on both sides. README: "Report and audit" has the figures.
DEFAULT_DUPLICATE_THRESHOLD = DUPLICATE_THRESHOLD


@dataclass(frozen=True)
class AuditOptions:
    """What the data-quality checks compute: label errors (``folds``-fold out-of-fold
    probabilities of the fast logreg, then confident learning), near-duplicates above
    ``duplicate_threshold`` and the split leaks among them, class imbalance above
    ``imbalance_ratio`` (largest class / smallest), failed files."""

    folds: int = 5  # K of the out-of-fold probabilities
    label_method: str = "prune_by_class"  # cleanlab's find_label_issues(filter_by=...): prune_by_class or prune_by_noise_rate
    dims: int = 128  # principal components kept (whitened) for similarities and the out-of-fold logreg; 0 = all
    duplicate_threshold: float = DEFAULT_DUPLICATE_THRESHOLD
    max_pairs: int = 10_000  # near-duplicate pairs kept (the most similar); bounds memory on heavily duplicated data
    near_duplicates: str = "auto"  # how pairs are searched: exact, ann (FAISS index, recall measured), auto (quality/ann.py)
    imbalance_ratio: float = 10.0
    val_fraction: float = 0.2  # the split of a cache that is not pre-split (as fit-head's default)
    seed: int = 0
    device: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})  # where similarities are computed: auto (the GPU when present), cpu, cuda[:N]
    memory_budget: str = field(default="auto", metadata={OUTSIDE_IDENTITY: True})  # over it the audit streams the cache (pipeline/memory.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_budget", check_budget(self.memory_budget))  # a number of GiB is accepted
        check_types(self)
        require(self.folds >= 2, f"--folds must be at least 2 (got {self.folds})")
        choose(self, "label_method", LABEL_METHODS, "cleanlab's find_label_issues filter_by methods")
        require(self.dims >= 0, f"--dims must be 0 (all) or more (got {self.dims})")
        require(0 < self.duplicate_threshold <= 1, f"--duplicate-threshold is a cosine similarity in (0, 1] (got {self.duplicate_threshold})")
        require(self.max_pairs >= 1, f"--max-pairs must be at least 1 (got {self.max_pairs})")
        choose(self, "near_duplicates", NEAR_DUPLICATE_SEARCH, "ann needs the ann extra: pip install 'featcache[ann]'")
        require(self.imbalance_ratio >= 1, f"--imbalance-ratio must be at least 1 (got {self.imbalance_ratio})")
        require(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        check_device(self)


@dataclass(frozen=True)
class ReportOptions(AuditOptions):
    """The audit's options plus what the report shows: the 2-D ``map`` (pca, or umap / tsne on
    a sample of ``map_points`` rows), at most ``max_images`` images per section, ``neighbours``
    training neighbours per mistake, thumbnails of ``thumb_size`` pixels."""

    map: str = "pca"
    map_points: int = 5000
    max_images: int = 48
    neighbours: int = 5
    thumb_size: int = 96

    def __post_init__(self) -> None:
        super().__post_init__()
        choose(self, "map", MAP_METHODS, "umap needs the umap extra: pip install -e '.[umap]'")
        require(self.map_points >= 10, f"--map-points must be at least 10 (got {self.map_points})")
        require(self.max_images >= 0, f"--max-images must be 0 or more (got {self.max_images})")
        require(self.neighbours >= 0, f"--neighbours must be 0 or more (got {self.neighbours})")
        require(16 <= self.thumb_size <= 512, f"--thumb-size must be 16 to 512 pixels (got {self.thumb_size})")


def parse_fail_on(text: str | None) -> tuple[str, ...]:
    """``--fail-on leaks,duplicates`` -> ("leaks", "duplicates"); ``all`` names every check."""
    if not text:
        return ()
    names = [canonical(t.strip(), AUDIT_CHECKS + ("all",)) for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in AUDIT_CHECKS + ("all",)]
    require(not unknown, f"--fail-on {', '.join(map(repr, unknown))}: choose from {', '.join(AUDIT_CHECKS)} or all (comma-separated)")
    return AUDIT_CHECKS if "all" in names else tuple(dict.fromkeys(names))
