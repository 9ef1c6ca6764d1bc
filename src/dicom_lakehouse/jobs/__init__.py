"""Jobs: the task entry point, the local runner and its contract with the tasks, the bundle, deployment and the scheduler."""
