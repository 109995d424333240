"""Pipeline parallelism: the stage trainer, its schedule, point-to-point sends, groups and shared weights."""
