"""Everything that runs on Ray: ``session`` the job's Ray (a cluster it joins, or its own on loopback) and the
dashboard line, ``placement`` how many workers and trials the nodes hold (pure sizing), ``trainer`` one run's
``TorchTrainer`` and its fit, ``worker`` the function each Ray Train worker runs around the pure loop, ``faults``
the test hooks that fail a run on purpose. Nothing is imported here: ``session`` stays light for the jobs' first
second."""
