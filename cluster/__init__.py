"""Ray integration: stage and evaluator actors, job submission, cluster YAMLs.

Importing this package sets the environment these machines need before Ray is imported
(Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import): an embedded Ray then
binds to the loopback interface only.  Ray itself is imported lazily, by the submodules
that need it (:mod:`~autobits.cluster.actors`, :mod:`~autobits.cluster.jobs`).

* :mod:`~autobits.cluster.runtime` -- :func:`ray_session` (embedded or ``--address``);
* :mod:`~autobits.cluster.actors` -- :class:`EvaluatorActor`, :class:`EvaluatorPool`;
* :mod:`~autobits.cluster.stages` -- :class:`RayStageRunner` (calibration and candidates on
  actors);
* :mod:`~autobits.cluster.search` -- ``RayOptions`` / ``prepare_on_ray`` /
  ``cluster_evaluate_factory`` for a search;
* :mod:`~autobits.cluster.jobs` -- Ray Job Submission (``autobits submit`` / ``jobs``);
* ``cluster/*.yaml`` -- ``ray up`` launcher configs (local multi-node, AWS).
"""

from autobits.cluster.runtime import apply_ray_env as _apply_ray_env

_apply_ray_env()

from autobits.cluster.search import RayOptions, cluster_evaluate_factory  # noqa: E402

__all__ = ["RayOptions", "cluster_evaluate_factory"]
