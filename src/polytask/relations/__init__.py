"""Which tasks to learn together: task-relation matrices, grouping solvers, clustering, transferability.

Estimators produce an :class:`AffinityMatrix` (``[i, j]`` = effect of task i on task j, with its cost); a group
score (:class:`TagScore`, :class:`HoaScore`, or any ``score(j, group)``) turns it into per-task values of
candidate groups, or :class:`Candidates` list networks with their own costs and values; a solver
(:func:`select_exact`, :func:`select_beam`) picks networks within a (real-valued) budget. Scores, solvers
and transferability metrics are registered by name in ``GROUP_SCORES``, ``GROUPING_SOLVERS`` and
``TRANSFERABILITY``.
"""

from polytask.relations.affinity import AffinityMatrix, spearman_rho
from polytask.relations.clustering import (
    STG_FUZZINESS,
    TaskClusters,
    cluster_tasks,
    facility_location,
    fuzzy_membership,
    select_representatives,
)
from polytask.relations.grouping import (
    GROUP_SCORES,
    GROUPING_SOLVERS,
    TAG_SINGLETON_SCORE,
    Candidate,
    Candidates,
    FunctionScore,
    Grouping,
    HoaScore,
    TableScore,
    TagScore,
    candidate_pool,
    evaluate_groups,
    select_beam,
    select_exact,
)
from polytask.relations.heatmap import heatmap_svg, save_heatmap
from polytask.relations.transferability import (
    TRANSFERABILITY,
    hscore,
    leep,
    logme,
    logme_evidence,
    nce,
    transferability_matrix,
)

__all__ = [
    "GROUPING_SOLVERS",
    "GROUP_SCORES",
    "STG_FUZZINESS",
    "TAG_SINGLETON_SCORE",
    "TRANSFERABILITY",
    "AffinityMatrix",
    "Candidate",
    "Candidates",
    "FunctionScore",
    "Grouping",
    "HoaScore",
    "TableScore",
    "TagScore",
    "TaskClusters",
    "candidate_pool",
    "cluster_tasks",
    "evaluate_groups",
    "facility_location",
    "fuzzy_membership",
    "heatmap_svg",
    "hscore",
    "leep",
    "logme",
    "logme_evidence",
    "nce",
    "save_heatmap",
    "select_beam",
    "select_exact",
    "select_representatives",
    "spearman_rho",
    "transferability_matrix",
]
