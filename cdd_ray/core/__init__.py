"""The pure primal-dual loop, knowing nothing of Ray, MLflow or progress bars: ``loop`` (``train`` and the
``Hooks`` a caller sees into it through), ``losses`` (the fused forward), ``batches`` (the random streams),
``state`` (checkpoint state and warm starts), ``dual`` (the multipliers and their step)."""
